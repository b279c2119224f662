"""Validation sampling during training: fixed prompts, seeds and sizes, every `validation.every_steps` steps.

Images go to `{output_dir}/samples/step{step:06d}_{prompt_index:02d}_{seed}.png` (with `_{h}x{w}` appended when
several sizes are configured), plus `step{step:06d}_grid.png` (a row per prompt, a column per size), and to the
trackers. Prompt i uses seed `validation.seed + i`, like `flowtrain sample --seed`, so a validation image can be
reproduced from a saved LoRA with that command. A video family's sample (a list of frames) is written as that PNG (its
frames side by side) plus `.mp4` and a `.gif` preview (`flowtrain.media`); trackers get the PNGs as images and the
.mp4 / .gif as artifacts under `samples/`.

Sampling reuses the transformer being trained (no copy): the main process puts it in eval mode, samples under
no_grad with the pipeline's own sampler, and puts it back. The text encoder is loaded once, at the first
validation, to embed the prompts (and the "" negative prompt for CFG), then freed; the VAE stays loaded and is
moved to the device only while sampling. The global RNG state is saved and restored around sampling, so a run with
validation trains exactly like one without. Other processes wait at a barrier meanwhile. Under DeepSpeed ZeRO-3
every process first gathers the whole transformer (`engines.whole_model`), so the main one can sample alone. With
FSDP no process holds the whole transformer and every forward pass all-gathers it (a collective): there every
process samples the same prompts with the same seeds, and only the main process writes images.

A failure while sampling (e.g. out of memory) is logged with its traceback and turns validation off for the rest
of the run: losing preview images must not kill a training run (or leave the other ranks waiting forever).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flowtrain.config import FlowtrainConfig
from flowtrain.dtypes import torch_dtype
from flowtrain.media import sample_fps, save_sample, still
from flowtrain.models import ModelFamily
from flowtrain.models.common import pad_rows
from flowtrain.train import engines
from flowtrain.train.engines import fsdp

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


def load_prompts(cfg: FlowtrainConfig) -> list[str]:
    """validation.prompts, or the non-empty lines of validation.prompts_file."""
    v = cfg.validation
    if v.prompts_file is None:
        return list(v.prompts)
    path = Path(v.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"validation.prompts_file: {path} does not exist (one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"validation.prompts_file: {path} has no prompts (one prompt per line)")
    return prompts


def image_name(step: int, prompt_index: int, seed: int, size: tuple[int, int] | None = None) -> str:
    """`step000100_02_7.png`; with `size` (several sizes configured) `step000100_02_7_512x768.png`."""
    suffix = f"_{size[0]}x{size[1]}" if size is not None else ""
    return f"step{step:06d}_{prompt_index:02d}_{seed}{suffix}.png"


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Tile rows of images (sizes may differ) into one image, each cell as large as the largest image."""
    cw = max(im.width for row in rows for im in row)
    ch = max(im.height for row in rows for im in row)
    out = Image.new("RGB", (cw * max(len(r) for r in rows), ch * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im, (c * cw, r * ch))
    return out


class Validator:
    """Validation sampling for one run. Build it on every process (config checks run everywhere, so a bad config
    fails on all ranks before training); only the main process samples."""

    def __init__(
        self, cfg: FlowtrainConfig, family: ModelFamily, output_dir: str | Path, *, resolution: int | None = None
    ):
        self.cfg, self.v, self.family = cfg, cfg.validation, family
        defaults = family.sampling_defaults  # the reference pipeline's own, where the config leaves them unset
        self.steps = defaults["steps"] if self.v.num_inference_steps is None else self.v.num_inference_steps
        self.guidance_scale = defaults["guidance_scale"] if self.v.guidance_scale is None else self.v.guidance_scale
        self.out = Path(output_dir) / SAMPLES_DIR
        self.enabled = self.v.enabled
        # Put before every file name (a pipeline stage sets `{stage}_epoch{e}_`, train.stages); step → text.
        self.name_prefix: Any = lambda step: ""
        self._pipe: Any = None
        self._conds: list[dict[str, torch.Tensor]] = []
        self._negative: dict[str, torch.Tensor] | None = None
        if not self.enabled:
            return
        self.prompts = load_prompts(cfg)
        sizes = [(int(h), int(w)) for h, w in self.v.sizes]
        if not sizes:
            if resolution is None:
                raise ValueError("validation.sizes is empty and the cache records no training resolution: set sizes")
            sizes = [(resolution, resolution)]
        self.sizes = sizes
        multiple = family.pixel_multiple(cfg.model)
        bad = [list(s) for s in sizes if s[0] % multiple or s[1] % multiple]
        if bad:
            fixed = [[max(multiple, round(x / multiple) * multiple) for x in s] for s in bad]
            raise ValueError(
                f"validation.sizes: {bad} not multiples of {multiple} (this model's VAE factor × latent patch); "
                f"round each side to a multiple of {multiple}, e.g. {fixed}"
            )

    def due(self, step: int, *, start: bool = False) -> bool:
        """`start`: the call before the first step (validation.at_start, fresh runs only)."""
        if not self.enabled:
            return False
        if start:
            return self.v.at_start and step == 0
        return bool(self.v.every_steps) and step > 0 and step % self.v.every_steps == 0

    def maybe_run(
        self,
        step: int,
        accelerator: Any,
        model: torch.nn.Module,
        tracker: Any,
        *,
        start: bool = False,
        weights: Callable[[], AbstractContextManager] | None = None,
    ) -> list[Path]:
        """Sample if `step` is a validation step; every process must call it (the others wait at a barrier).

        `weights`: a context-manager factory that swaps the weights to sample with into the model and back (EMA:
        pass the EMA object's swap here when EMA is on); None samples the trained weights as they are.
        """
        if not self.due(step, start=start):
            return []
        paths: list[Path] = []
        main, everywhere = accelerator.is_main_process, fsdp.sharded(accelerator)
        with engines.whole_model(accelerator, model):  # DeepSpeed ZeRO-3: gathered on every process meanwhile
            if main or everywhere:  # FSDP: every process samples (each forward all-gathers); the main one writes
                try:
                    paths = self.run(step, engines.unwrap(accelerator, model), accelerator.device, accelerator.autocast,
                                     weights, write=main)  # fmt: skip
                except Exception:
                    log.exception("validation failed at step %d; validation is off for the rest of this run", step)
                    self.enabled = False
                if main:
                    tracker.log_images(step, {f"{SAMPLES_DIR}/{p.name}": p for p in paths if p.suffix == ".png"})
                    for p in paths:  # videos (.mp4) and their previews (.gif) are files, not images, to trackers
                        if p.suffix != ".png":
                            tracker.log_artifact(p, SAMPLES_DIR)
            accelerator.wait_for_everyone()
        return paths

    def run(
        self,
        step: int,
        transformer: torch.nn.Module,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        weights: Callable[[], AbstractContextManager] | None = None,
        *,
        write: bool = True,
    ) -> list[Path]:
        """Sample every prompt at every size with `transformer`; returns the files written (images, then grid; a video
        adds its .mp4 and .gif after its PNG).
        `write=False`: sample only (an FSDP process other than the main one, taking part in the all-gathers)."""
        t0 = time.perf_counter()
        if self._pipe is None:
            self._load(device, write=write)
        pipe, v = self._pipe, self.v
        dtype = getattr(transformer, "dtype", torch.float32)
        was_training = transformer.training
        if pipe.vae.dtype != dtype:  # decode in the latents' dtype, which follows the transformer's
            pipe.vae.to(dtype=dtype)
        pipe.vae.to(device)
        rows: list[list[Image.Image]] = []
        paths: list[Path] = []
        if write:
            self.out.mkdir(parents=True, exist_ok=True)
        cuda = [device.index or 0] if device.type == "cuda" else []
        try:
            transformer.eval()
            with (
                torch.random.fork_rng(devices=cuda),
                torch.no_grad(),
                autocast(),
                (weights or contextlib.nullcontext)(),
            ):
                negative = None if self._negative is None else _to(self._negative, device, dtype)
                for i, cond in enumerate(self._conds):
                    seed, row = v.seed + i, []
                    for size in self.sizes:
                        image = self.family.sample(
                            pipe,
                            transformer,
                            _to(cond, device, dtype),
                            negative,
                            height=size[0],
                            width=size[1],
                            steps=self.steps,
                            guidance_scale=self.guidance_scale,
                            generator=torch.Generator("cpu").manual_seed(seed),
                        )
                        name = image_name(step, i, seed, size if len(self.sizes) > 1 else None)
                        path = self.out / f"{self.name_prefix(step)}{name}"
                        if write:  # a video: its frame strip at `path`, plus .mp4 and .gif (media.py)
                            paths += save_sample(image, path, sample_fps(self.cfg.model))
                        row.append(still(image))
                    rows.append(row)
        finally:
            transformer.train(was_training)
            pipe.vae.to("cpu")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not write:
            return []
        grid_path = self.out / f"{self.name_prefix(step)}step{step:06d}_grid.png"
        grid(rows).save(grid_path)
        paths.append(grid_path)
        log.info(
            "validation: %d images at step %d in %.1fs → %s", len(paths) - 1, step, time.perf_counter() - t0, self.out
        )
        return paths

    def _load(self, device: torch.device, *, write: bool = True) -> None:
        """Load the encoders (the pipeline without its transformer), encode the prompts once, and free the text
        encoders."""
        m = self.cfg.model
        with _no_loading_bars():
            pipe = self.family.load_encoders(m, dtype=torch_dtype(m.dtype), device=device)
        pipe.set_progress_bar_config(disable=True)

        def encode(prompt: str) -> dict[str, torch.Tensor]:  # one at a time: what `pipe(prompt=...)` computes
            out = {}
            for k, v in self.family.encode_prompts(pipe, [prompt], m).items():
                if isinstance(v, list):  # a variable-length column: a batch of 1 as the cache reader collates it
                    v, out[f"{k}_mask"] = pad_rows(v)
                out[k] = v
            return {k: v.cpu() for k, v in out.items()}

        self._conds = [encode(p) for p in self.prompts]
        self._negative = encode("") if self.guidance_scale > 1 else None
        # Text encoders and tokenizers (diffusers names them text_encoder, text_encoder_2, tokenizer, ...) are not
        # needed again: free them before training goes on.
        pipe.register_modules(**{k: None for k in pipe.components if k.startswith(("text_encoder", "tokenizer"))})
        pipe.vae.to("cpu")
        self._pipe = pipe
        if write:
            self._write_prompts()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _write_prompts(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        listing = "".join(f"{i:02d}\t{self.v.seed + i}\t{p}\n" for i, p in enumerate(self.prompts))
        (self.out / "prompts.txt").write_text(listing)  # index, seed, prompt of the image names


def _to(cond: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Conditioning on `device`, floating tensors in the sampling `dtype` (masks keep theirs)."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """diffusers / transformers loading bars would break up the training progress bar."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in states:
            if was:
                lib.enable_progress_bar()
