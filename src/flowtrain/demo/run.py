"""`flowtrain demo`: the whole job on real data, on a CPU, in minutes, with a number to trust.

    load_digits → PNG folder (+ held-out test split) ─prepare─▶ raw shards
      ─the training pipeline (configs/demo/pipeline.yaml, what `flowtrain train` runs):
         vae:      AutoencoderKLFlux2 + fitted latent stats (configs/demo/autoencoder.yaml)
         assemble: Klein pipeline folder (that VAE, tiny Qwen3, random transformer) + latent cache (demo.pipeline)
         dit:      transformer trained from scratch (configs/demo/train.yaml)
      ─sample──────▶ N images per digit prompt with CFG ─score─▶ prompt adherence vs the classifier's ceiling

Every stage is the product's own function (prepare, the pipeline runner, sample.generate); this module only
wires them to one run folder. What is demo-only: the data set builder (`demo.digits`), the assemble step
(`demo.pipeline`) and the scorer (`demo.score`).

Run folder (`--out`, default runs/demo): data/, raw/, stages/{vae,assemble,dit}/, pipeline.json, config.yaml,
samples/, samples.png, loss_curve.png, demo_report.json. `flowtrain demo` refuses an earlier demo's folder unless given
`--overwrite` (`flowtrain.outputs`); `run_demo` itself replaces the stage folders of an earlier demo.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from flowtrain.demo.config import DemoConfig, load_demo_config
from flowtrain.outputs import DEMO_MARKER

log = logging.getLogger(__name__)

STAGE_DIRS = ("data", "raw", "stages", "samples")
OUTPUT_FILES = ("samples.png", "loss_curve.png", "demo_report.json", "pipeline.json", "config.yaml")
ROOT = Path(__file__).resolve().parents[3]  # this checkout (the package is installed editable from src/)


def default_config_path() -> Path:
    """configs/demo/demo.yaml of this checkout (the package is installed editable from src/)."""
    return ROOT / "configs" / "demo" / "demo.yaml"


class _Stages:
    """Times each stage and announces it, so a newcomer sees where the minutes go."""

    def __init__(self, total: int, progress: bool):
        self.total, self.progress, self.n = total, progress, 0
        self.seconds: dict[str, float] = {}
        # CPU seconds of this process next to wall seconds: on a busy machine wall time says little on its own.
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        self.n += 1
        if self.progress:
            print(f"\n[{self.n}/{self.total}] {name}: {what}", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.cpu_seconds[name] = round(time.process_time() - c0, 2)
        if self.progress:
            print(f"[{self.n}/{self.total}] {name}: done in {self.seconds[name]:.1f}s", flush=True)


MARKER = DEMO_MARKER  # how `flowtrain.outputs` tells a demo folder from others


def _claim(out: Path) -> None:
    """The demo replaces its stage folders in `out`: only ever in a new or empty folder, or an earlier demo's."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(
            f"--out {out} is not empty and was not made by `flowtrain demo`; the demo replaces folders such as "
            f"{out / 'data'} there, so give a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `flowtrain demo`; its stage folders here are replaced on each run\n")


def run_demo(
    config: str | Path | None = None,
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage into `out`; returns the report (also written to `{out}/demo_report.json`)."""
    import torch

    from flowtrain.config import FlowtrainConfig
    from flowtrain.data.prepare import prepare
    from flowtrain.demo import digits, report, score
    from flowtrain.sample import generate, load_sampling_pipeline, save_images
    from flowtrain.train.stages import run_pipeline

    t_start = time.perf_counter()
    config = Path(config) if config is not None else default_config_path()
    cfg: DemoConfig = load_demo_config(config, overrides, quick=quick)
    out = Path(out)
    paths = {name: out / name for name in STAGE_DIRS}
    size = cfg.data.image_size
    # The pipeline is validated before anything runs: a typo fails in a second, not after training.
    pipe_cfg = _pipeline_config(config.parent / cfg.pipeline_config, cfg, out, quick)
    vae_dir, dit_dir = paths["stages"] / "vae", paths["stages"] / "dit"
    _claim(out)
    for name in STAGE_DIRS:
        shutil.rmtree(paths[name], ignore_errors=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    stage = _Stages(total=5, progress=progress)
    _quiet_library_progress_bars()
    prompts = [digits.caption_for(d, cfg.data.caption_template) for d in range(10)]

    with stage("data", "scikit-learn digits → captioned PNGs → `prepare` shards"):
        split = digits.load_split(cfg.data.test_fraction, cfg.data.seed)
        n_gen = cfg.data.max_train_images or len(split.train_y)
        digits.write_folder(
            paths["data"] / "train", split.train_x[:n_gen], split.train_y[:n_gen], size, cfg.data.caption_template
        )
        digits.write_folder(paths["data"] / "test", split.test_x, split.test_y, size, cfg.data.caption_template)
        prep = prepare(paths["data"] / "train", paths["raw"], progress=progress)

    dit_steps = pipe_cfg.train.max_steps
    with stage("pipeline", f"configs/demo/{cfg.pipeline_config}: autoencoder, assemble + precompute, transformer "
               f"from scratch ({dit_steps} steps)"):  # fmt: skip
        result = run_pipeline(pipe_cfg, progress=progress)
    ae = result.stages["vae"]
    train_cfg = FlowtrainConfig.model_validate({**pipe_cfg.model_dump(mode="json"), "stages": []})

    with stage("sample", f"{cfg.sample.per_digit} images per digit prompt, CFG {cfg.sample.guidance_scale}"):
        pipe = load_sampling_pipeline(train_cfg.model, transformer=str(dit_dir / "transformer"))
        images = generate(
            pipe,
            prompts,
            train_cfg.model,
            seed=cfg.sample.seed,
            steps=cfg.sample.steps,
            guidance_scale=cfg.sample.guidance_scale,
            height=size,
            width=size,
            images_per_prompt=cfg.sample.per_digit,
            batch_size=cfg.sample.batch_size,
            progress=progress,
        )
        save_images(images, paths["samples"], prompts, cfg.sample.per_digit)

    with stage("score", "classifier trained on the real training digits labels each sample"):
        scorer = score.DigitScorer().fit(score.real_features(split.train_x, size), split.train_y)
        ceiling = scorer.accuracy(score.real_features(split.test_x, size), split.test_y)
        vae_ceiling = _vae_roundtrip_accuracy(pipe, split, size, scorer)
        prompted = np.repeat(np.arange(10), cfg.sample.per_digit)
        predicted = scorer.predict(score.features(images))
        adh = score.adherence(predicted, prompted)

    with stage("report", "samples.png, loss_curve.png, demo_report.json"):
        per_row = cfg.sample.per_digit
        grid = report.samples_grid(images, prompted.tolist(), predicted.tolist(), per_row, cfg.sample.cell_scale)
        grid.save(out / "samples.png")
        report.loss_curve(
            {
                "stage vae: autoencoder reconstruction loss": (vae_dir, "rec"),
                "stage dit: transformer flow-matching loss": (dit_dir, "loss"),
            },
            out / "loss_curve.png",
        )
    ae_params = sum(p.numel() for p in pipe.vae.parameters())
    dit_params = sum(p.numel() for p in pipe.transformer.parameters())
    rep: dict[str, Any] = {
        "prompt_adherence": adh["accuracy"],
        "per_digit_adherence": adh["per_digit"],
        "confusion": adh["confusion"],
        "classifier_test_accuracy": ceiling,
        "classifier_vae_roundtrip_accuracy": vae_ceiling,
        "classifier": "sklearn SVC (RBF, C=10) on 8×8 grey levels, fitted on the training digits",
        "target_adherence": cfg.target_adherence,
        "target_met": adh["accuracy"] >= cfg.target_adherence,
        "samples": {
            "per_digit": cfg.sample.per_digit,
            "total": len(images),
            "steps": cfg.sample.steps,
            "guidance_scale": cfg.sample.guidance_scale,
            "seed": cfg.sample.seed,
        },
        "data": {
            "image_size": size,
            "train": int(len(split.train_y)),
            "test": int(len(split.test_y)),
            "prepared": prep.written,
            "skipped": prep.skipped,
        },
        "models": {"vae_parameters": ae_params, "transformer_parameters": dit_params},
        "final_losses": {
            "autoencoder": ae.get("final"),
            "autoencoder_reconstruction_l1": ae.get("reconstruction_l1"),
            "transformer": result.losses[max(result.losses)] if result.losses else None,
            "transformer_steps": result.step,
        },
        "stage_seconds": stage.seconds,
        "stage_cpu_seconds": stage.cpu_seconds,
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        # the CLI's choice for this machine's load at start, or the user's (see docs/demo.md)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "config": str(config),
        "paths": {
            "samples": str(out / "samples.png"),
            "loss_curve": str(out / "loss_curve.png"),
            "report": str(out / "demo_report.json"),
            "autoencoder_run": str(vae_dir),
            "train_run": str(dit_dir),
            "pipeline": str(pipe_cfg.model.pretrained),
            "pipeline_config": str(config.parent / cfg.pipeline_config),
        },
    }
    report.write_report(out / "demo_report.json", rep)
    return rep


def _pipeline_config(path: Path, cfg: DemoConfig, out: Path, quick: bool) -> Any:
    """configs/demo/pipeline.yaml for the run folder `out`: its stages' paths moved there, the demo's image size
    and overrides applied (the autoencoder stage's to its autoencoder_overrides)."""
    from flowtrain.config import FlowtrainConfig, resolve_config, validate_config

    assemble = out / "stages" / "assemble"
    resolved = resolve_config(
        path,
        [
            *cfg.stage_overrides.train,
            *(cfg.quick.train if quick else []),
            f"output_dir={out}",
            f"model.pretrained={assemble / 'pipeline'}",
            f"dataset.cache_dir={assemble / 'cache'}",
        ],
    )
    raw, size = out / "raw", cfg.data.image_size
    for st in resolved.data.get("stages", []):
        if st.get("kind") == "autoencoder":
            given = Path(st["autoencoder"])
            st["autoencoder"] = str(given if given.is_absolute() or given.exists() else ROOT / given)
            st["autoencoder_overrides"] = [
                *st.get("autoencoder_overrides", []),
                *cfg.stage_overrides.autoencoder,
                *(cfg.quick.autoencoder if quick else []),
                f"data.raw_dir={raw}",
                f"data.resolution={size}",
            ]
        elif st.get("kind") == "python":
            st.setdefault("args", {}).update(
                raw_dir=str(raw), resolution=size, caption_template=cfg.data.caption_template,
                batch_size=cfg.precompute_batch_size,
            )  # fmt: skip
    pipe_cfg = validate_config(resolved, FlowtrainConfig)
    if pipe_cfg.train_mode != "full":
        raise ValueError(f"{path}: the demo trains a transformer from scratch; set train_mode: full")
    return pipe_cfg


def _quiet_library_progress_bars() -> None:
    """diffusers' / transformers' own bars (loading, saving shards) would bury the stages' bars."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _vae_roundtrip_accuracy(pipe: Any, split: Any, size: int, scorer: Any) -> float:
    """The scorer on held-out digits after encode → decode by the trained VAE: what the latent space allows."""
    import torch
    from PIL import Image

    from flowtrain.autoencoder.data import to_pixels
    from flowtrain.demo import digits, score

    pixels = torch.stack([to_pixels(digits.digit_image(x, size), size) for x in split.test_x]).to(pipe.vae.device)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
    arr = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    feats = score.features([Image.fromarray(a) for a in arr])
    return float((scorer.predict(feats) == split.test_y).mean())


def summary(rep: dict[str, Any]) -> str:
    """The lines `flowtrain demo` prints at the end."""
    per = " ".join(f"{d}:{v:.0%}" for d, v in rep["per_digit_adherence"].items() if v is not None)
    verdict = "met" if rep["target_met"] else "NOT met"
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in rep["stage_seconds"].items())
    return "\n".join(
        [
            "",
            f"prompt adherence: {rep['prompt_adherence']:.1%} of {rep['samples']['total']} samples show the "
            f"prompted digit (target {rep['target_adherence']:.0%}: {verdict})",
            f"  per digit: {per}",
            f"  classifier ceiling: {rep['classifier_test_accuracy']:.1%} on held-out real digits "
            f"({rep['classifier_vae_roundtrip_accuracy']:.1%} after the VAE round trip)",
            f"time: {rep['total_seconds']:.0f}s ({stages})",
            f"samples:     {rep['paths']['samples']}  (rows = digits 0-9; green frame = classified as prompted)",
            f"loss curves: {rep['paths']['loss_curve']}",
            f"report:      {rep['paths']['report']}",
            f"MLflow / metrics: {rep['paths']['train_run']} and {rep['paths']['autoencoder_run']} (logs/, graphs/)",
        ]
    )
