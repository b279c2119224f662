"""DreamBooth prior preservation (class rows paired with instance rows, resumably) and distillation, in training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flowtrain.data.cache import CacheDataset, ResumableSampler
from flowtrain.data.prior import WithClassRows, check_class_cache, class_sampler
from flowtrain.data.tensors import column_to_tensor, tensor_column

# First logged loss of the tiny LoRA run (seed 0, lr 1e-3, batch 2), as in tests/train/test_resume_and_golden.py.
GOLDEN_FIRST = 1.668452


def _class_cache(src: Path, dst: Path) -> Path:
    """A copy of the session cache with negated latents: same model and settings, recognisably other rows."""
    shutil.copytree(src, dst)
    for shard in json.loads((dst / "manifest.json").read_text())["shards"]:
        path = dst / shard["file"]
        table = pq.read_table(path)
        moments = -column_to_tensor(table.column("latent_moments"), "float32")
        i = table.schema.get_field_index("latent_moments")
        table = table.set_column(i, "latent_moments", tensor_column(moments, "float32"))
        pq.write_table(table, path, compression="zstd", row_group_size=16)
    return dst


@pytest.fixture(scope="module")
def class_cache(tiny_cache, tmp_path_factory) -> Path:
    return _class_cache(tiny_cache[1], tmp_path_factory.mktemp("class") / "cache")


def _loader(dataset, start_epoch=0, start_batch=0, batch=2):
    from torch.utils.data import DataLoader

    sampler = ResumableSampler(len(dataset), batch, seed=3, start_epoch=start_epoch, start_batch=start_batch)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=dataset.collate), sampler


def with_class_rows(loader, class_cache: str, sampler) -> WithClassRows:
    """The instance loader with the class cache's rows, as the run builds it."""
    from torch.utils.data import DataLoader

    cls = CacheDataset(class_cache)
    rows = class_sampler(sampler, len(cls))
    return WithClassRows(loader, DataLoader(cls, batch_size=rows.batch_size, sampler=rows, collate_fn=cls.collate))


def _take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            return out


def test_class_rows_are_paired_resumably(tiny_cache, class_cache):
    inst, cls = CacheDataset(tiny_cache[1]), CacheDataset(class_cache)
    loader, sampler = _loader(inst)
    merged = _take(with_class_rows(loader, str(class_cache), sampler), 7)  # > one epoch (4 batches)
    class_rows = iter(ResumableSampler(len(cls), 2, seed=4))  # shuffle seed + 1
    for b in merged:
        assert b["is_prior"].tolist() == [False, False, True, True]
        assert torch.equal(b["latent_moments"][:2], torch.stack([inst[i]["latent_moments"] for i in b["index"]]))
        expected = torch.stack([cls[next(class_rows)]["latent_moments"] for _ in range(2)])
        assert torch.equal(b["latent_moments"][2:], expected)
        assert b["index"].shape == (2,)
    # a loader resumed at epoch 1, batch 1 (the 6th batch) pairs exactly what the uninterrupted one did
    loader, sampler = _loader(inst, start_epoch=1, start_batch=1)
    resumed = _take(with_class_rows(loader, str(class_cache), sampler), 2)
    for a, b in zip(resumed, merged[5:], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_class_cache_of_another_model_is_refused(tiny_cache, tmp_path):
    inst = CacheDataset(tiny_cache[1])
    other = tmp_path / "other"
    shutil.copytree(tiny_cache[1], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"]["settings"]["text_encoder_layers"] = [1, 2, 3]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="dataset.class_cache_dir.*text_encoder_layers"):
        check_class_cache(inst.manifest, CacheDataset(other).manifest, other)


def test_prior_preservation_training(tiny_pipeline_dir, tiny_cache, class_cache, tmp_path, monkeypatch):
    from flowtrain.testing.training import RecordingLoss, train_config
    from flowtrain.train.loop import train

    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "db", train={"max_steps": 2},
        dataset={"class_cache_dir": str(class_cache)}, loss={"name": "prior_preservation", "prior_loss_weight": 0.5},
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert sorted(result.losses) == [1, 2] and all(v == v for v in result.losses.values())
    assert (tmp_path / "db" / "pytorch_lora_weights.safetensors").exists()
    # Both parts reach the metrics, and the total is instance + weight · prior.
    from flowtrain.track import read_metrics

    for row in read_metrics(tmp_path / "db" / "logs" / "metrics.jsonl"):
        assert row["loss"] == pytest.approx(row["loss/instance"] + 0.5 * row["loss/prior"], rel=1e-5)
    # The class rows reach the loss: a loss that ignores them (the recording flow-matching loss) sees 4 rows.
    RecordingLoss.calls.clear()
    from flowtrain.config import FlowtrainConfig

    d = cfg.model_dump()
    d["loss"] = {"name": "flowtrain.testing.training:RecordingLoss"}
    d["output_dir"] = str(tmp_path / "db2")
    d["train"]["max_steps"] = 1
    train(FlowtrainConfig.model_validate(d), progress=False)
    assert [c["batch"] for c in RecordingLoss.calls] == [4]


def test_distillation_from_the_base_teacher(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    """The teacher is the base model and LoRA starts at zero: the student equals the teacher at step 1, so the
    teacher term is exactly 0 and the first loss is the plain flow-matching golden loss. A wrong teacher input
    (another x_σ, σ or text) would make it non-zero."""
    from flowtrain.testing.training import train_config
    from flowtrain.train.loop import train

    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "kd", train={"max_steps": 1},
        loss={"name": "distillation", "teacher": str(tiny_pipeline_dir), "distill_weight": 10.0},
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert round(result.losses[1], 6) == pytest.approx(GOLDEN_FIRST, abs=1e-6)
