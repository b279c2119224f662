"""`flowtrain demo --video`: text-to-video on real data, on a CPU, with a number to trust.

    load_digits → moving-digit .mp4 + caption folder ("a handwritten digit seven moving left") ─prepare─▶ raw shards
      ─the training pipeline (configs/demo/video_pipeline.yaml, what `flowtrain train` runs):
         vae:      tiny AutoencoderKLWan + fitted latents_mean / std, on 5-D batches (video_autoencoder.yaml)
         assemble: WanPipeline folder (that VAE, tiny UMT5, random transformer) + 5-D latent cache (demo.video_pipeline)
         dit:      Wan transformer trained from scratch (video_train.yaml)
      ─sample──────▶ clips per (digit, direction) prompt with CFG ─score─▶ digit, motion and joint adherence

As in the image demo (`demo.run`), every stage is the product's own function (prepare, the pipeline runner,
sample.generate); what is demo-only is the data (`demo.video_data`), the assemble step (`demo.video_pipeline`) and
the scorer (`demo.video_score`). Run folder (`--out`, default runs/demo-video): data/, raw/, stages/{vae,assemble,dit}/,
pipeline.json, samples/ (each clip as .png strip, .mp4, .gif), samples.mp4 / samples.gif (the grid video),
samples.png (frame strips), loss_curve.png, demo_report.json.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from flowtrain.config.section import Section
from flowtrain.demo.config import DemoQuickConfig, StageOverrides
from flowtrain.demo.run import ROOT, _claim, _quiet_library_progress_bars, _Stages

STAGE_DIRS = ("data", "raw", "stages", "samples")
OUTPUT_FILES = ("samples.png", "samples.mp4", "samples.gif", "loss_curve.png", "demo_report.json", "pipeline.json",
                "config.yaml")  # fmt: skip


class VideoDemoDataConfig(Section):
    frames: int = Field(9, gt=1, description="Frames per clip (4k+1: the video VAE compresses time 4×).")
    canvas: int = Field(32, gt=0, description="Side of the square frames (pixels).")
    digit_size: int = Field(16, gt=0, description="Side of the digit on the canvas (a multiple of 8).")
    fps: int = Field(8, gt=0, description="Frame rate of the written .mp4 files.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Held-out real digits (the scorer's ceiling).")
    max_train_clips: int | None = Field(None, gt=0, description="Train on only the first N training digits.")
    seed: int = 0
    caption_template: str = Field(
        "a handwritten digit {name} moving {direction}", description="`{name}`, `{digit}` and `{direction}`."
    )


class VideoDemoSampleConfig(Section):
    per_prompt: int = Field(2, gt=0, description="Clips per prompt (40 prompts: 10 digits × 4 directions).")
    steps: int = Field(20, gt=0, description="Sampler steps (WanPipeline's UniPC).")
    guidance_scale: float = Field(4.0, ge=0, description="Classifier-free guidance with the empty prompt; ≤ 1 off.")
    seed: int = 1234
    min_shift: float = Field(4.0, gt=0, description="Centroid travel (pixels) below which a clip counts as static.")


class VideoDemoConfig(Section):
    kind: Literal["video_demo"] = "video_demo"
    pipeline_config: str = Field("video_pipeline.yaml", description="The training pipeline, relative to this file.")
    data: VideoDemoDataConfig = Field(default_factory=VideoDemoDataConfig)
    sample: VideoDemoSampleConfig = Field(default_factory=VideoDemoSampleConfig)
    target_adherence: float = Field(0.8, ge=0, le=1, description="Joint adherence reported as met / not met.")
    stage_overrides: StageOverrides = Field(default_factory=StageOverrides)
    quick: DemoQuickConfig = Field(default_factory=DemoQuickConfig)
    precompute_batch_size: int = Field(64, gt=0)


def default_video_config_path() -> Path:
    return ROOT / "configs" / "demo" / "video.yaml"


def load_video_demo_config(path: str | Path, overrides: Sequence[str] = (), *, quick: bool = False) -> VideoDemoConfig:
    from flowtrain.config import resolve_config, validate_config

    cfg = validate_config(resolve_config(path, overrides), VideoDemoConfig)
    if quick and cfg.quick.demo:
        cfg = validate_config(resolve_config(path, [*cfg.quick.demo, *overrides]), VideoDemoConfig)
    return cfg


def run_video_demo(
    config: str | Path | None = None,
    out: str | Path = "runs/demo-video",
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage into `out`; returns the report (also written to `{out}/demo_report.json`)."""
    import torch

    from flowtrain.config import FlowtrainConfig
    from flowtrain.data.prepare import prepare
    from flowtrain.demo import digits, report, video_data, video_report, video_score
    from flowtrain.sample import generate, load_sampling_pipeline, save_images
    from flowtrain.train.stages import run_pipeline

    t_start, c_start = time.perf_counter(), time.process_time()
    config = Path(config) if config is not None else default_video_config_path()
    cfg = load_video_demo_config(config, overrides, quick=quick)
    d = cfg.data
    video_data.trajectory("left", d.frames, d.canvas, d.digit_size)  # a size that cannot be drawn fails here
    out = Path(out)
    paths = {name: out / name for name in STAGE_DIRS}
    pipe_cfg = _pipeline_config(config.parent / cfg.pipeline_config, cfg, out, quick)
    if pipe_cfg.dataset.video.frames != d.frames or pipe_cfg.model.num_frames != d.frames:
        raise ValueError(
            f"{cfg.pipeline_config}: dataset.video.frames={pipe_cfg.dataset.video.frames} and model.num_frames="
            f"{pipe_cfg.model.num_frames} must both equal the demo's data.frames={d.frames}"
        )
    # the video VAE trains in two stages (5-frame clips, then 9): the second is the one the pipeline uses
    vae5_dir, vae_dir, dit_dir = paths["stages"] / "vae", paths["stages"] / "vae9", paths["stages"] / "dit"
    _claim(out)
    for name in STAGE_DIRS:
        shutil.rmtree(paths[name], ignore_errors=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    stage = _Stages(total=5, progress=progress)
    _quiet_library_progress_bars()
    combos = [(dig, m) for dig in range(10) for m in video_data.DIRECTIONS]
    prompts = [video_data.caption_for(dig, m, d.caption_template) for dig, m in combos]

    with stage("data", "scikit-learn digits → moving-digit .mp4 clips + captions → `prepare` shards"):
        split = digits.load_split(d.test_fraction, d.seed)
        n = d.max_train_clips or len(split.train_y)
        video_data.write_video_folder(paths["data"] / "train", split.train_x[:n], split.train_y[:n], frames=d.frames,
                                      canvas=d.canvas, digit_size=d.digit_size, fps=d.fps, seed=d.seed,
                                      template=d.caption_template, progress=progress)  # fmt: skip
        prep = prepare(paths["data"] / "train", paths["raw"], progress=progress, min_frames=d.frames)

    dit_steps = pipe_cfg.train.max_steps
    with stage("pipeline", f"configs/demo/{cfg.pipeline_config}: video autoencoder, assemble + precompute, Wan "
               f"transformer from scratch ({dit_steps} steps)"):  # fmt: skip
        result = run_pipeline(pipe_cfg, progress=progress)
    ae = result.stages["vae9"]
    train_cfg = FlowtrainConfig.model_validate({**pipe_cfg.model_dump(mode="json"), "stages": []})

    s = cfg.sample
    with stage("sample", f"{s.per_prompt} clips per prompt × {len(prompts)} prompts, CFG {s.guidance_scale}"):
        pipe = load_sampling_pipeline(train_cfg.model, transformer=str(dit_dir / "transformer"))
        videos = generate(pipe, prompts, train_cfg.model, seed=s.seed, steps=s.steps, guidance_scale=s.guidance_scale,
                          height=d.canvas, width=d.canvas, images_per_prompt=s.per_prompt, batch_size=1,
                          progress=progress)  # fmt: skip
        save_images(videos, paths["samples"], prompts, s.per_prompt, fps=d.fps)
        clips = [np.stack([np.asarray(f.convert("RGB")) for f in v]) for v in videos]

    with stage("score", "digit: classifier on the real training digits; motion: the ink centroid's direction"):
        scorer = video_score.fit_scorer(split.train_x, split.train_y, d.canvas, d.digit_size)
        ceiling = _real_ceiling(scorer, split, d, s.min_shift)
        vae_ceiling = _vae_roundtrip_ceiling(pipe.vae, scorer, split, d, s.min_shift)
        want = [c for c in combos for _ in range(s.per_prompt)]
        got_digit = [video_score.clip_digit(scorer, c, d.digit_size) for c in clips]
        got_dir = [video_score.motion_direction(c, s.min_shift) for c in clips]
        adh = video_score.video_adherence(got_digit, got_dir, [w[0] for w in want], [w[1] for w in want])

    with stage("report", "samples.mp4 / .gif (grid video), samples.png (frame strips), loss_curve.png, report"):
        ok = [g == w[0] and m == w[1] for g, m, w in zip(got_digit, got_dir, want, strict=True)]
        labels = [f"{w[0]} {w[1]}: {g} {m}" for g, m, w in zip(got_digit, got_dir, want, strict=True)]
        sample_paths = video_report.write_samples(out, clips, labels, ok, cols=4 * s.per_prompt, fps=d.fps)
        report.loss_curve(
            {
                "stage vae: video autoencoder reconstruction loss, 5-frame clips": (vae5_dir, "rec"),
                "stage vae9: the same, 9-frame clips": (vae_dir, "rec"),
                "stage dit: Wan transformer flow-matching loss": (dit_dir, "loss"),
            },
            out / "loss_curve.png",
        )
    rep: dict[str, Any] = {
        **{
            k: adh[k]
            for k in (
                "joint_adherence",
                "digit_adherence",
                "motion_adherence",
                "per_digit_joint",
                "per_direction_joint",
                "motion_confusion",
                "motion_confusion_columns",
            )
        },  # fmt: skip
        "classifier_test_accuracy": ceiling["digit_adherence"],
        "real_clips_ceiling": ceiling,
        "vae_roundtrip_ceiling": vae_ceiling,
        "classifier": "sklearn SVC (RBF, C=10) on 8×8 grey levels of a centroid-centred crop, majority over frames",
        "target_adherence": cfg.target_adherence,
        "target_met": adh["joint_adherence"] >= cfg.target_adherence,
        "samples": {
            "per_prompt": s.per_prompt,
            "prompts": len(prompts),
            "total": len(clips),
            "steps": s.steps,
            "guidance_scale": s.guidance_scale,
            "seed": s.seed,
            "frames": d.frames,
            "size": d.canvas,
        },
        "data": {
            "frames": d.frames,
            "canvas": d.canvas,
            "digit_size": d.digit_size,
            "train": int(n),
            "test": int(len(split.test_y)),
            "prepared": prep.written,
            "skipped": prep.skipped,
        },
        "models": {
            "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()),
            "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        },
        "final_losses": {
            "autoencoder": ae.get("final"),
            "autoencoder_reconstruction_l1": ae.get("reconstruction_l1"),
            "transformer": result.losses[max(result.losses)] if result.losses else None,
            "transformer_steps": result.step,
        },
        "stage_seconds": stage.seconds,
        "stage_cpu_seconds": stage.cpu_seconds,
        "total_seconds": round(time.perf_counter() - t_start, 2),
        # process CPU time: on a shared machine the honest measure of the work (wall time depends on the neighbours)
        "total_cpu_seconds": round(time.process_time() - c_start, 2),
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "config": str(config),
        "paths": {
            **sample_paths,
            "loss_curve": str(out / "loss_curve.png"),
            "report": str(out / "demo_report.json"),
            "autoencoder_run": str(vae_dir),
            "train_run": str(dit_dir),
            "pipeline": str(pipe_cfg.model.pretrained),
        },  # fmt: skip
    }
    report.write_report(out / "demo_report.json", rep)
    return rep


def _pipeline_config(path: Path, cfg: VideoDemoConfig, out: Path, quick: bool) -> Any:
    """configs/demo/video_pipeline.yaml for the run folder `out`: stage paths moved there, the demo's size and
    overrides applied (the autoencoder stage's to its autoencoder_overrides)."""
    from flowtrain.config import FlowtrainConfig, resolve_config, validate_config

    assemble = out / "stages" / "assemble"
    resolved = resolve_config(
        path,
        [*cfg.stage_overrides.train, *(cfg.quick.train if quick else []), f"output_dir={out}",
         f"model.pretrained={assemble / 'pipeline'}", f"dataset.cache_dir={assemble / 'cache'}"],
    )  # fmt: skip
    raw, size = out / "raw", cfg.data.canvas
    for st in resolved.data.get("stages", []):
        if st.get("kind") == "autoencoder":
            given = Path(st["autoencoder"])
            st["autoencoder"] = str(given if given.is_absolute() or given.exists() else ROOT / given)
            st["autoencoder_overrides"] = [*st.get("autoencoder_overrides", []), *cfg.stage_overrides.autoencoder,
                                           *(cfg.quick.autoencoder if quick else []), f"data.raw_dir={raw}",
                                           f"data.resolution={size}"]  # fmt: skip
        elif st.get("kind") == "python":
            st.setdefault("args", {}).update(raw_dir=str(raw), resolution=size, batch_size=cfg.precompute_batch_size)
    pipe_cfg = validate_config(resolved, FlowtrainConfig)
    if pipe_cfg.train_mode != "full":
        raise ValueError(f"{path}: the video demo trains a transformer from scratch; set train_mode: full")
    return pipe_cfg


def _test_clips(split: Any, d: VideoDemoDataConfig, limit: int) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Held-out real digits, the i-th moving in direction i mod 4."""
    from flowtrain.demo.video_data import DIRECTIONS, render_clip, trajectory

    x, y = split.test_x[:limit], split.test_y[:limit]
    dirs = [DIRECTIONS[i % 4] for i in range(len(y))]
    clips = [render_clip(a, trajectory(m, d.frames, d.canvas, d.digit_size), d.canvas, d.digit_size)
             for a, m in zip(x, dirs, strict=True)]  # fmt: skip
    return clips, [int(v) for v in y], dirs


def _score(scorer: Any, clips: list[np.ndarray], y: list[int], dirs: list[str], d: Any, min_shift: float) -> dict:
    from flowtrain.demo.video_score import clip_digit, motion_direction, video_adherence

    a = video_adherence([clip_digit(scorer, c, d.digit_size) for c in clips],
                        [motion_direction(c, min_shift) for c in clips], y, dirs)  # fmt: skip
    return {k: a[k] for k in ("digit_adherence", "motion_adherence", "joint_adherence")}


def _real_ceiling(scorer: Any, split: Any, d: VideoDemoDataConfig, min_shift: float) -> dict:
    """The scorer on held-out real digits moving: what a perfect generator would score."""
    clips, y, dirs = _test_clips(split, d, len(split.test_y))
    return _score(scorer, clips, y, dirs, d, min_shift)


def _vae_roundtrip_ceiling(vae: Any, scorer: Any, split: Any, d: VideoDemoDataConfig, min_shift: float) -> dict:
    """The scorer on 100 held-out moving digits after encode → decode by the trained VAE: what its latents allow."""
    import torch

    clips, y, dirs = _test_clips(split, d, 100)
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # (B, 3, F, H, W)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(vae.device)).latent_dist.mean).sample
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    return _score(scorer, list(arr), y, dirs, d, min_shift)


def video_summary(rep: dict[str, Any]) -> str:
    """The lines `flowtrain demo --video` prints at the end."""
    verdict = "met" if rep["target_met"] else "NOT met"
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in rep["stage_seconds"].items())
    ceil, vae = rep["real_clips_ceiling"], rep["vae_roundtrip_ceiling"]
    return "\n".join([
        "",
        f"joint adherence: {rep['joint_adherence']:.1%} of {rep['samples']['total']} clips show the prompted digit "
        f"moving the prompted way (target {rep['target_adherence']:.0%}: {verdict})",
        f"  digit {rep['digit_adherence']:.1%}, motion {rep['motion_adherence']:.1%}",
        f"  ceiling on real held-out clips: joint {ceil['joint_adherence']:.1%}; after the VAE round trip: "
        f"{vae['joint_adherence']:.1%}",
        f"time: {rep['total_seconds']:.0f}s wall, {rep['total_cpu_seconds']:.0f}s CPU ({stages})",
        f"samples:     {rep['paths']['samples_video']} (grid video), {rep['paths']['samples']} (frame strips)",
        f"loss curves: {rep['paths']['loss_curve']}",
        f"report:      {rep['paths']['report']}",
    ])  # fmt: skip
