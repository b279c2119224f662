"""`flowtrain demo --video`: the moving-digits data set and its scorer.

The data functions are pure (trajectory, caption, rendering) and checked without files; one test writes real .mp4
clips and runs them through the product's `prepare`. The scorer is checked on constructed clips (each direction,
a static one, a blank one) and on real held-out digits moving across the canvas, where it must read both the
digit and the motion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flowtrain.demo.video_data import (
    DIRECTIONS,
    INK,
    PAPER,
    assign_directions,
    caption_for,
    render_clip,
    trajectory,
    write_video_folder,
)
from flowtrain.demo.video_score import (
    STATIC,
    centroid,
    clip_digit,
    displacement,
    fit_scorer,
    motion_direction,
    video_adherence,
)


def test_caption_names_digit_and_direction():
    assert caption_for(7, "left") == "a handwritten digit seven moving left"
    assert caption_for(0, "up", "digit {digit} goes {direction}") == "digit 0 goes up"
    with pytest.raises(ValueError, match="expected one of left, right, up, down"):
        caption_for(1, "sideways")


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_trajectory_crosses_the_canvas_and_stays_on_it(direction):
    xy = trajectory(direction, frames=9, canvas=32, digit_size=16)
    assert xy.shape == (9, 2)
    assert (xy >= 0).all() and (xy + 16 <= 32).all()  # wholly on the canvas in every frame
    step = np.diff(xy, axis=0)
    axis = 0 if direction in ("left", "right") else 1
    sign = -1 if direction in ("left", "up") else 1
    assert (step[:, 1 - axis] == 0).all()  # no drift across the motion
    assert (sign * step[:, axis] == 2).all()  # 16 px in 8 steps, evenly
    assert abs(int(xy[-1, axis]) - int(xy[0, axis])) == 16  # edge to edge
    assert (xy[:, 1 - axis] == 8).all()  # centred across


def test_trajectory_refuses_what_cannot_be_drawn():
    with pytest.raises(ValueError, match="does not fit"):
        trajectory("left", 9, canvas=16, digit_size=24)
    with pytest.raises(ValueError, match="off the canvas"):
        trajectory("up", 9, canvas=32, digit_size=16, offset=17)
    with pytest.raises(ValueError, match="at least 2 frames"):
        trajectory("up", 1, canvas=32, digit_size=16)


def test_render_clip_draws_the_digit_where_the_trajectory_says():
    x8 = np.zeros((8, 8), np.float32)
    x8[0, 0] = 16  # one full-ink pixel at the digit's top-left → a 2×2 block of ink
    xy = trajectory("right", 9, 32, 16)
    clip = render_clip(x8, xy, 32, 16)
    assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8
    assert set(np.unique(clip).tolist()) == {INK, PAPER}  # inside (0, 255): the Wan VAE's clamp never binds
    for f, (x, y) in enumerate(xy):
        black = np.argwhere(clip[f, :, :, 0] == INK)
        assert black.min(0).tolist() == [y, x] and black.max(0).tolist() == [y + 1, x + 1]
    with pytest.raises(ValueError, match="leaves the 32px canvas"):
        render_clip(x8, np.array([[20, 0]]), 32, 16)


def test_directions_are_balanced():
    idx = assign_directions(103, seed=3)
    counts = np.bincount(idx, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    assert not (idx == np.arange(103) % 4).all()  # shuffled


def _bar_clip(direction: str | None, frames: int = 9) -> np.ndarray:
    """An ink 6×10 bar on the paper, moving 16 px in `direction` (None: standing still in the middle)."""
    x8 = np.zeros((8, 8), np.float32)
    x8[1:6, 2:5] = 16
    if direction is None:
        return render_clip(x8, np.full((frames, 2), 8), 32, 16)
    return render_clip(x8, trajectory(direction, frames, 32, 16), 32, 16)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_motion_scorer_reads_each_direction(direction):
    clip = _bar_clip(direction)
    assert motion_direction(clip) == direction
    dx, dy = displacement(clip)
    assert max(abs(dx), abs(dy)) == pytest.approx(16, abs=0.01)


def test_motion_scorer_calls_still_and_blank_clips_static():
    assert motion_direction(_bar_clip(None)) == STATIC
    assert displacement(_bar_clip(None)) == (pytest.approx(0), pytest.approx(0))
    blank = np.full((9, 32, 32, 3), PAPER, np.uint8)
    assert centroid(blank[0]) is None and motion_direction(blank) == STATIC
    # faint background noise (under the ink floor) does not move the centroid of a still digit
    noisy = _bar_clip(None).astype(int) - np.random.default_rng(0).integers(0, 24, (9, 32, 32, 1))
    assert motion_direction(noisy.clip(0, 255).astype(np.uint8)) == STATIC


def test_video_adherence_counts_joint_hits():
    a = video_adherence([1, 2, 3, 4], ["left", "up", "up", STATIC], [1, 2, 5, 4], ["left", "down", "up", "down"])
    assert (a["digit_adherence"], a["motion_adherence"], a["joint_adherence"]) == (0.75, 0.5, 0.25)
    assert a["per_digit_joint"]["1"] == 1.0 and a["per_digit_joint"]["0"] is None
    assert a["motion_confusion"][DIRECTIONS.index("down")] == [0, 0, 1, 0, 1]


def test_scorer_reads_real_held_out_digits_moving():
    """The ceiling: real test digits, each moving in each direction, read with the scorer fitted on the
    training digits. Digit and motion must both come out right for nearly all."""
    from flowtrain.demo.digits import load_split

    split = load_split()
    scorer = fit_scorer(split.train_x, split.train_y, canvas=32, digit_size=16)
    x, y = split.test_x[:80], split.test_y[:80]
    dirs = [DIRECTIONS[i % 4] for i in range(len(y))]
    clips = [render_clip(d, trajectory(m, 9, 32, 16), 32, 16) for d, m in zip(x, dirs, strict=True)]
    got_digit = [clip_digit(scorer, c, 16) for c in clips]
    got_dir = [motion_direction(c) for c in clips]
    a = video_adherence(got_digit, got_dir, y, dirs)
    assert a["motion_adherence"] == 1.0
    assert a["digit_adherence"] >= 0.95, a


def test_video_folder_goes_through_prepare(tmp_path):
    """Real .mp4 files + captions → `prepare` → raw shards with 9-frame videos; decoded frames still score."""
    import pyarrow.parquet as pq

    from flowtrain.data.prepare import prepare
    from flowtrain.data.video import decode_frames
    from flowtrain.demo.digits import load_split

    split = load_split()
    written = write_video_folder(tmp_path / "clips", split.test_x[:8], split.test_y[:8], frames=9, canvas=32)
    assert len(list((tmp_path / "clips").glob("*.mp4"))) == 8
    assert (tmp_path / "clips" / "0000.txt").read_text() == caption_for(*written[0])
    rep = prepare(tmp_path / "clips", tmp_path / "raw", progress=False)
    assert rep.written == 8 and rep.skipped == 0
    table = pq.read_table(sorted((tmp_path / "raw").glob("*.parquet"))[0])
    rows = table.to_pylist()
    assert {r["num_frames"] for r in rows} == {9} and {(r["width"], r["height"]) for r in rows} == {(32, 32)}
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["videos"] == 8
    by_key = {r["key"]: r for r in rows}
    for i in range(8):
        frames = np.stack([np.asarray(f) for f in decode_frames(by_key[f"{i:04d}"]["image"], range(9))])
        assert motion_direction(frames) == written[i][1]


STAGES = ["data", "pipeline", "sample", "score", "report"]


def _check_video_run(out, rep: dict, *, per_prompt: int) -> None:
    from PIL import Image

    from flowtrain.demo.video_report import check_video_report

    assert check_video_report(rep) == []
    assert list(rep["stage_seconds"]) == STAGES == list(rep["stage_cpu_seconds"])
    assert rep["samples"]["total"] == 40 * per_prompt == len(list((out / "samples").glob("*_*.mp4")))
    assert sum(sum(row) for row in rep["motion_confusion"]) == 40 * per_prompt
    # the scorer itself reads real moving digits (its ceiling), whatever the generator learned
    assert rep["real_clips_ceiling"]["joint_adherence"] >= 0.95
    with Image.open(out / "samples.png") as im:  # one frame strip per clip
        assert im.size[1] >= 40 * per_prompt * 32
    with Image.open(out / "samples.gif") as im:
        assert im.n_frames == 9
    import av

    with av.open(str(out / "samples.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    for path in ("stages/vae/vae/config.json", "stages/vae9/vae/config.json", "stages/vae9/latent_stats.json",
                 "raw/manifest.json",
                 "stages/assemble/pipeline/model_index.json", "stages/assemble/cache/manifest.json",
                 "stages/dit/transformer/config.json", "loss_curve.png"):  # fmt: skip
        assert (out / path).exists(), path
    record = json.loads((out / "pipeline.json").read_text())["stages"]
    assert [(k, v["status"]) for k, v in record.items()] == [
        ("vae", "done"), ("vae9", "done"), ("assemble", "done"), ("dit", "done")]  # fmt: skip


def test_video_demo_quick_path(tmp_path):
    """`flowtrain demo --video --quick` through the CLI: every stage runs, every file is written, the report is
    well-formed, and the cache holds 5-D clip latents of the demo's VAE (4× space, 4× time)."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    out = tmp_path / "vdemo"
    proc = subprocess.run([sys.executable, "-m", "flowtrain", "demo", "--video", "--quick", "--quiet", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "joint adherence:" in proc.stdout
    rep = json.loads((out / "demo_report.json").read_text())
    _check_video_run(out, rep, per_prompt=1)
    assert rep["data"]["prepared"] == 16 and rep["quick"] is True
    vae_cfg = json.loads((out / "stages/vae9/vae/config.json").read_text())  # the VAE the pipeline uses
    assert (vae_cfg["scale_factor_spatial"], vae_cfg["scale_factor_temporal"]) == (4, 4)
    stats = json.loads((out / "stages/vae9/latent_stats.json").read_text())
    assert vae_cfg["latents_mean"] == stats["latents_mean"] and len(stats["latents_std"]) == vae_cfg["z_dim"]
    shard = sorted((out / "stages/assemble/cache").glob("*.parquet"))[0]
    col = pq.read_schema(shard).field("latent_moments").type
    assert tuple(col.shape) == (2 * vae_cfg["z_dim"], 3, 8, 8)  # (2C, (9-1)/4+1, 32/4, 32/4) moments


def test_video_demo_refuses_frames_the_pipeline_does_not_train(tmp_path):
    from flowtrain.demo.video import run_video_demo

    with pytest.raises(ValueError, match="must both equal the demo's data.frames=5"):
        run_video_demo(out=tmp_path / "x", quick=True, overrides=["data.frames=5"], progress=False)
    assert not (tmp_path / "x").exists()  # refused before anything was written


@pytest.mark.slow
def test_video_demo_meets_its_target(tmp_path):
    """The full video demo (configs/demo/video.yaml) reaches its joint-adherence target (benchmarks/demo_video.py
    measures the time)."""
    from flowtrain.demo.video import run_video_demo

    rep = run_video_demo(out=tmp_path / "vdemo", progress=False)
    _check_video_run(tmp_path / "vdemo", rep, per_prompt=rep["samples"]["per_prompt"])
    assert rep["target_met"], {k: rep[k] for k in ("joint_adherence", "digit_adherence", "motion_adherence")}


def test_autoencoder_takes_video_clips_and_wan_fits_its_latent_stats(tmp_path):
    """The autoencoder trainer's data side for a video VAE: `data.frames` gives (3, F, R, R) clips of the prepared
    .mp4s (the first F frames, as precompute's `head`); the wan family builds an AutoencoderKLWan from the generic
    model keys (4× space for 3 levels, always 4× time) and fits latents_mean / latents_std so that the normalised
    posterior means have per-channel mean 0 and std 1 on the data."""
    import torch

    from flowtrain.autoencoder.config import AutoencoderConfig
    from flowtrain.autoencoder.data import RawClipDataset, raw_dataset
    from flowtrain.data.prepare import prepare
    from flowtrain.demo.digits import load_split
    from flowtrain.models.wan.autoencoder import build_vae, fit_latent_stats, pixel_multiple

    split = load_split()
    write_video_folder(tmp_path / "clips", split.test_x[:6], split.test_y[:6])
    prepare(tmp_path / "clips", tmp_path / "raw", progress=False)
    cfg = AutoencoderConfig.model_validate({
        "family": "wan", "model": {"block_out_channels": [8, 16, 16], "latent_channels": 4},
        "data": {"raw_dir": str(tmp_path / "raw"), "resolution": 32, "frames": 5},
    })  # fmt: skip
    data = raw_dataset(cfg.data)
    assert isinstance(data, RawClipDataset) and len(data) == 6
    clip = data[0]
    assert clip.shape == (3, 5, 32, 32) and -1.0 <= clip.min() < clip.max() <= 1.0
    with pytest.raises(ValueError, match="4k\\+1"):
        RawClipDataset(tmp_path / "raw", 32, 6)
    with pytest.raises(ValueError, match="no video of at least data.frames=13"):
        RawClipDataset(tmp_path / "raw", 32, 13)
    assert pixel_multiple(cfg.model) == 8
    torch.manual_seed(0)
    vae = build_vae(cfg.model)
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (4, 4)
    stats = fit_latent_stats(vae, data, batch_size=4, progress=False)
    assert stats["clips"] == 6 and vae.config.latents_mean == stats["latents_mean"]
    with torch.no_grad():
        z = vae.encode(torch.stack([data[i] for i in range(6)])).latent_dist.mean  # (6, 4, 2, 8, 8)
    assert z.shape == (6, 4, 2, 8, 8)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    x = ((z - mean) / std).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(x.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(1, correction=0), torch.ones(4), atol=1e-4, rtol=0)
