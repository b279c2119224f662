"""Wan through the generic trainer on the tiny pipeline with a cache of 9-frame video clips (fp32, CPU): golden
losses, exact resume (in process and through kill -9), caption dropout on the padded text, validation videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowtrain.testing.training import assert_resume_exact, train_config
from flowtrain.train.loop import train

# First losses of the tiny Wan LoRA run on the moving-squares video cache (seed 0, lr 1e-3, batch 2, rank 4 on
# `attention`, logit-normal σ with the scheduler's flow_shift 3.0, torch 2.13 / diffusers 0.42.1 CPU). They change
# only when the numerics do.
GOLDEN = [1.542281, 1.541339, 1.652865, 1.643675]


def _cfg(pipeline: Path, cache: Path, out: Path, **sections):
    """The tiny LoRA config for Wan, with the family's (static) shift, as configs/wan21_t2v_1_3b."""
    sections.setdefault("timesteps", {"shift_mode": "resolution"})
    sections.setdefault("model", {"num_frames": 9})
    return train_config(pipeline, cache, out, family="wan", **sections)


def test_the_cache_holds_video_latents(video_cache):
    from flowtrain.data.cache import CacheDataset

    manifest = json.loads((video_cache / "manifest.json").read_text())
    shapes = {c["name"]: c["shape"] for c in manifest["columns"]}
    assert shapes["latent_moments"] == [32, 3, 4, 4] and shapes["prompt_embeds"] == [None, 32]
    row = CacheDataset(video_cache)[0]
    assert row["latent_moments"].shape == (32, 3, 4, 4)


def test_golden_losses(wan_dir, video_cache, tmp_path):
    result = train(_cfg(wan_dir, video_cache, tmp_path / "run", train={"max_steps": 4}), progress=False)
    got = [round(result.losses[s], 6) for s in sorted(result.losses)]
    assert all(np.isfinite(got)) and len(got) == 4
    assert got == pytest.approx(GOLDEN, abs=1e-6), got


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_uninterrupted(wan_dir, video_cache, tmp_path, mode):
    """6 steps straight == 3 steps, resume, 3 more, bitwise, on video batches with every random draw the step makes
    (posterior sample, caption dropout, LoRA dropout)."""
    extra = {"train_mode": mode, "lora": {"dropout": 0.1}, "train": {"max_steps": 6, "caption_dropout": 0.3},
             "dataset": {"latent_sampling": "sample"}}  # fmt: skip
    assert_resume_exact(*(_cfg(wan_dir, video_cache, tmp_path / run, **extra) for run in "ab"), stop=3)


def test_caption_dropout_gives_the_empty_prompts_padded_embedding(wan_dir, video_cache, fam, pipe, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """What reaches the transformer: (B, max_sequence_length, D), zero past each prompt's length; dropped rows are
    exactly the pipeline's padded "" embedding."""
    seen: list[torch.Tensor] = []
    predict = fam.predict

    def recording(transformer, x_t, sigma, cond, shape):
        seen.append(cond["encoder_hidden_states"].detach().clone())
        assert shape == (3, 4, 4) and x_t.shape[1:] == (48, 16)
        return predict(transformer, x_t, sigma, cond, shape)

    monkeypatch.setattr(fam, "predict", recording)
    cfg = _cfg(wan_dir, video_cache, tmp_path / "drop", train={"max_steps": 4, "caption_dropout": 0.5})
    train(cfg, progress=False)
    empty, _ = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=32)
    rows = torch.cat(seen)
    assert rows.shape == (8, 32, 32)
    dropped = [bool(torch.equal(r, empty[0])) for r in rows]
    assert 0 < sum(dropped) < 8


def test_validation_videos_equal_flowtrain_sample(wan_dir, video_cache, tmp_path, validation_run, record_property):
    """Validation during training writes each prompt's video (.mp4, .gif preview, frame-strip .png);
    `flowtrain sample --lora RUN` gives the same frames from the saved LoRA."""

    def config(run: Path, validation: dict):
        return _cfg(wan_dir, video_cache, run, validation=validation, train={"max_steps": 2})

    prompts = ["a red square moving left", "a blue square moving up"]
    ours, sample = validation_run(wan_dir, prompts, tmp_path, config)
    same = sample("same", "model.num_frames=9")
    assert ours[0].shape == (32, 9 * 32, 3)  # nine 32×32 frames side by side
    diffs = [int(np.abs(a - b).max()) for a, b in zip(ours, same, strict=True)]
    record_property("png_max_diff", diffs)
    assert max(diffs) <= 1
    run_samples = tmp_path / "run" / "samples"
    for i in range(2):
        stem = run_samples / f"step000002_{i:02d}_{5 + i}"
        assert stem.with_suffix(".mp4").stat().st_size > 0 and stem.with_suffix(".gif").stat().st_size > 0
        assert (tmp_path / "same" / f"{i:03d}_00.mp4").exists() and (tmp_path / "same" / f"{i:03d}_00.gif").exists()
    import av

    with av.open(str(run_samples / "step000002_00_5.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 9


@pytest.mark.slow  # ~40 s: the MLflow store and its logging process start
def test_mlflow_logs_the_validation_videos_as_artifacts(wan_dir, video_cache, tmp_path):
    """MLflow (the default tracker) holds each validation video: the frame-strip PNG as an image, the .mp4 and the
    .gif preview as artifacts under samples/."""
    from mlflow.tracking import MlflowClient

    from flowtrain.track.mlflow_store import local_store_uri

    out = tmp_path / "tracked"
    validation = {"every_steps": 2, "prompts": ["a red square moving left"], "num_inference_steps": 2}
    cfg = _cfg(wan_dir, video_cache, out, train={"max_steps": 2}, validation=validation,
               tracking={"report_to": ["mlflow"], "experiment_name": "wan-tests", "graphs": False})  # fmt: skip
    train(cfg, progress=False)
    client = MlflowClient(local_store_uri(out))
    run_id = json.loads((out / "logs" / "mlflow_run.json").read_text())["run_id"]
    names = {f.path for f in client.list_artifacts(run_id, "samples")}
    stem = "samples/step000002_00_0"
    assert {f"{stem}.png", f"{stem}.mp4", f"{stem}.gif", "samples/step000002_grid.png"} <= names, names


def test_memory_savers_leave_the_losses_bitwise(wan_dir, video_cache, tmp_path):
    """Block swap of every block plus checkpointing every other one on Wan's blocks (the shipped config turns
    checkpointing on): the fp32 losses and the trained LoRA equal the run without them, bit for bit."""
    from safetensors.torch import load_file

    runs = {}
    for name, opts in {"plain": {}, "savers": {"blocks_to_swap": 2, "gradient_checkpointing": "every:2"}}.items():
        result = train(_cfg(wan_dir, video_cache, tmp_path / name, train={"max_steps": 3, **opts}), progress=False)
        runs[name] = (result.losses, load_file(tmp_path / name / "pytorch_lora_weights.safetensors"))
    assert runs["savers"][0] == runs["plain"][0]
    assert all(torch.equal(runs["savers"][1][k], v) for k, v in runs["plain"][1].items())
