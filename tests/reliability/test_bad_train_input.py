"""`train` on bad input: a clear error that names the file / row / key / config key and the fix — or, for a
non-finite loss, the configured policy (skip and count, or stop with the last checkpoint intact)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from flowtrain.cli import main
from flowtrain.data.cache import CacheDataset, CacheError
from flowtrain.data.tensors import column_to_tensor, tensor_column
from flowtrain.train import loop as loop_mod
from flowtrain.train.checkpoint import list_checkpoints, load_checkpoint
from flowtrain.train.errors import EXIT_NONFINITE, NonFiniteLossError
from flowtrain.train.loop import train

SHARD = "cache-00000-0000.parquet"


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(cache: Path, fn) -> None:
    """Apply `fn(dict of column name -> torch tensor / list)` to the one shard and write it back."""
    path = cache / SHARD
    table = pq.read_table(path)
    cols = {
        "key": table.column("key").to_pylist(),
        "caption": table.column("caption").to_pylist(),
        "latent_moments": column_to_tensor(table.column("latent_moments"), "float32"),
        "text_embeds": column_to_tensor(table.column("text_embeds"), "float32"),
    }
    fn(cols)
    pq.write_table(
        pa.table(
            {
                "key": pa.array(cols["key"], pa.string()),
                "caption": pa.array(cols["caption"], pa.string()),
                "latent_moments": tensor_column(cols["latent_moments"], "float32"),
                "text_embeds": tensor_column(cols["text_embeds"], "float32"),
            }
        ),
        path,
        row_group_size=4,
    )


def _cli_config(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


# ---- the cache ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("column", "value"), [("latent_moments", float("nan")), ("text_embeds", float("inf"))])
def test_nonfinite_cache_row_names_file_row_and_key(tiny_cache, rel_cfg, tmp_path, column, value):
    cache = _copy_cache(tiny_cache[1], tmp_path / "cache")

    def poison(cols):
        cols[column][5].view(-1)[7] = value

    _rewrite_shard(cache, poison)
    ds = CacheDataset(cache)
    for i in range(4):  # the first row group is clean
        ds[i]
    with pytest.raises(CacheError) as err:
        ds[4]
    msg = str(err.value)
    assert SHARD in msg and "row 5" in msg and "'img05'" in msg and column in msg and "NaN/inf" in msg
    assert "precompute" in msg
    cfg = rel_cfg(tmp_path / "run", dataset={"cache_dir": str(cache), "shuffle": False}, train={"max_steps": 4})
    with pytest.raises(CacheError, match="row 5 \\(key 'img05'\\)"):
        train(cfg, progress=False)


def test_nonfinite_row_in_a_dataloader_worker_is_one_clear_cli_message(tiny_cache, rel_cfg, tmp_path, capsys):
    cache = _copy_cache(tiny_cache[1], tmp_path / "cache")
    _rewrite_shard(cache, lambda cols: cols["latent_moments"][2].fill_(float("nan")))
    cfg = rel_cfg(tmp_path / "run", dataset={"cache_dir": str(cache), "num_workers": 2}, train={"max_steps": 8})
    assert main(["train", str(_cli_config(tmp_path, cfg)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "row 2 (key 'img02')" in err and SHARD in err
    assert "Traceback" not in err and "Original Traceback" not in err


def test_shard_with_wrong_tensor_shape_is_refused_at_open(tiny_cache, tmp_path):
    cache = _copy_cache(tiny_cache[1], tmp_path / "cache")

    def shrink(cols):
        cols["latent_moments"] = cols["latent_moments"][:, :, :8, :8].contiguous()

    _rewrite_shard(cache, shrink)
    with pytest.raises(CacheError, match=r"column 'latent_moments' holds tensors of shape \[8, 8, 8\]") as err:
        CacheDataset(cache)
    assert "manifest.json says [8, 16, 16]" in str(err.value) and "precompute" in str(err.value)


def test_missing_or_truncated_shard_is_refused_at_open(tiny_cache, tmp_path):
    cache = _copy_cache(tiny_cache[1], tmp_path / "cache")
    _rewrite_shard(cache, lambda cols: [cols.__setitem__(k, v[:6]) for k, v in list(cols.items())])
    with pytest.raises(CacheError, match="6 rows, manifest.json says 8"):
        CacheDataset(cache)
    (cache / SHARD).write_bytes(b"PAR1 not really")
    with pytest.raises(CacheError, match="not a readable Parquet file"):
        CacheDataset(cache)
    (cache / SHARD).unlink()
    with pytest.raises(CacheError, match="listed in manifest.json but missing; rerun `flowtrain precompute`"):
        CacheDataset(cache)


def test_empty_cache_and_missing_cache(tiny_cache, rel_cfg, tmp_path):
    cache = _copy_cache(tiny_cache[1], tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.update(num_rows=0, shards=[])
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="the cache holds no rows"):
        train(rel_cfg(tmp_path / "r", dataset={"cache_dir": str(cache)}), progress=False)
    with pytest.raises(FileNotFoundError, match="manifest.json not found: run `flowtrain precompute"):
        train(rel_cfg(tmp_path / "r", dataset={"cache_dir": str(tmp_path / "nothing")}), progress=False)


def test_batch_larger_than_dataset_names_the_key(rel_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"8 rows, fewer than one global batch \(train.batch_size=16"):
        train(rel_cfg(tmp_path / "r", train={"batch_size": 16}), progress=False)


def test_cache_made_for_other_settings_or_model(tiny_cache, rel_cfg, tmp_path):
    with pytest.raises(ValueError, match="max_sequence_length=32.*Re-run precompute") as err:
        train(rel_cfg(tmp_path / "r", model={"max_sequence_length": 64}), progress=False)
    assert "manifest.json" in str(err.value)
    # a cache whose text embeddings are 128 wide: what another text encoder (another model) would have made
    cache = _copy_cache(tiny_cache[1], tmp_path / "cache")
    _rewrite_shard(cache, lambda c: c.__setitem__("text_embeds", torch.nn.functional.pad(c["text_embeds"], (0, 32))))
    manifest = json.loads((cache / "manifest.json").read_text())
    next(c for c in manifest["columns"] if c["name"] == "text_embeds")["shape"] = [32, 128]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="wrong model for this cache"):
        train(rel_cfg(tmp_path / "r", dataset={"cache_dir": str(cache)}), progress=False)


def test_missing_model_path(rel_cfg, tmp_path, capsys):
    cfg = rel_cfg(tmp_path / "r", model={"pretrained": str(tmp_path / "no-such-model")})
    with pytest.raises(FileNotFoundError, match="no-such-model'.*no such file or folder"):
        train(cfg, progress=False)
    assert main(["train", str(_cli_config(tmp_path, cfg)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained=" in err and "no such file or folder" in err and "Traceback" not in err
    not_a_pipeline = tmp_path / "empty-folder"
    not_a_pipeline.mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        train(rel_cfg(tmp_path / "r", model={"pretrained": str(not_a_pipeline)}), progress=False)


# ---- non-finite loss ---------------------------------------------------------------------------------------------


def _nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """Make the loss NaN at these step indices (0-based), so the backward pass gives NaN gradients too."""
    current = {}
    real_seed, real_loss = loop_mod.step_seed, loop_mod.step_loss

    def step_seed(seed, step, micro, rank):
        current["step"] = step
        return real_seed(seed, step, micro, rank)

    def step_loss(*args, **kwargs):
        loss, logs = real_loss(*args, **kwargs)
        return (loss * float("nan"), logs) if current["step"] in steps else (loss, logs)

    monkeypatch.setattr(loop_mod, "step_seed", step_seed)
    monkeypatch.setattr(loop_mod, "step_loss", step_loss)


def test_nonfinite_skip_counts_and_keeps_weights(rel_cfg, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2, 3})
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 6}, checkpoint={"every_steps": 1, "keep_last": None})
    res = train(cfg, progress=False)
    assert res.step == 6
    rows = [json.loads(line) for line in (tmp_path / "r" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert [r["loss"] != r["loss"] for r in rows] == [False, False, True, True, False, False]  # NaN where skipped
    w = {s: load_checkpoint(p)["trainable"] for s, p in list_checkpoints(tmp_path / "r")}
    assert all(torch.equal(w[2][k], w[4][k]) for k in w[2])  # steps 3 and 4 made no update
    assert any(not torch.equal(w[4][k], w[5][k]) for k in w[4])  # training went on afterwards
    assert all(torch.isfinite(t).all() for t in w[6].values())
    assert json.loads((tmp_path / "r" / "checkpoint-6" / "state.json").read_text())["nonfinite"] == {
        "total": 2,
        "in_a_row": 0,
    }


def test_nonfinite_too_many_in_a_row_stops_with_last_checkpoint_intact(rel_cfg, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {3, 4, 5, 6})
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 8, "max_nonfinite_in_a_row": 2}, checkpoint={"every_steps": 1})
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "step 5" in msg and "2 in a row" in msg and "checkpoint-4 is intact" in msg
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [3, 4]  # step 4 was skipped but saved; 5 never
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "r" / "checkpoint-4")["trainable"].values())


def test_nonfinite_policy_stop_exits_3(rel_cfg, tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {2})
    cfg = rel_cfg(tmp_path / "r", train={"max_steps": 6, "nonfinite": "stop"}, checkpoint={"every_steps": 1})
    assert main(["train", str(_cli_config(tmp_path, cfg)), "--quiet"]) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "non-finite loss or gradients at step 3" in err and "train.nonfinite=stop" in err
    assert "checkpoint-2 is intact" in err and "Traceback" not in err
    assert [s for s, _ in list_checkpoints(tmp_path / "r")] == [1, 2]
