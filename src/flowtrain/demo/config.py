"""`configs/demo/demo.yaml`: the demo's own knobs. The training is the shipped pipeline config it names
(configs/demo/pipeline.yaml, relative to the demo config's folder), with the demo's run folder applied as
overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from flowtrain.config.section import Section


class DemoDataConfig(Section):
    image_size: int = Field(16, gt=0, description="Side of the RGB images made from the 8×8 digits (multiple of 8).")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Held-out real digits (the scorer's ceiling).")
    max_train_images: int | None = Field(
        None, gt=0, description="Train the generator on only the first N training digits (the scorer uses all)."
    )
    seed: int = 0
    caption_template: str = Field("a handwritten digit {name}", description="`{name}` → zero..nine, `{digit}` → 0..9.")

    @field_validator("image_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"image_size must be a multiple of 8 (8×8 digits upscaled by replication), got {v}")
        return v


class DemoSampleConfig(Section):
    per_digit: int = Field(20, gt=0, description="Images generated per digit prompt.")
    steps: int = Field(20, gt=0, description="Euler steps of the flow-matching sampler.")
    guidance_scale: float = Field(4.0, ge=0, description="Classifier-free guidance with the empty prompt; ≤ 1 off.")
    batch_size: int = Field(200, gt=0, description="Images per pipeline call.")
    seed: int = 1234
    cell_scale: int = Field(4, gt=0, description="Nearest-neighbour upscaling of each image in samples.png.")


class StageOverrides(Section):
    """Dotted overrides of the pipeline, e.g. `train: [train.max_steps=1000, ema.enabled=true]`."""

    autoencoder: list[str] = Field(
        default_factory=list, description="Appended to the pipeline's autoencoder stage's autoencoder_overrides."
    )
    train: list[str] = Field(default_factory=list, description="Applied to `pipeline_config` (its base config).")


class DemoQuickConfig(StageOverrides):
    """Dotted overrides `--quick` applies (a tiny budget for tests and a first look)."""

    demo: list[str] = Field(default_factory=list, description="Applied to this demo config.")


class DemoConfig(Section):
    kind: Literal["demo"] = "demo"
    pipeline_config: str = Field(
        "pipeline.yaml", description="The training pipeline (autoencoder → assemble → dit), relative to this file."
    )
    data: DemoDataConfig = Field(default_factory=DemoDataConfig)
    sample: DemoSampleConfig = Field(default_factory=DemoSampleConfig)
    target_adherence: float = Field(0.9, ge=0, le=1, description="Reported as met / not met (benchmarks assert it).")
    stage_overrides: StageOverrides = Field(default_factory=StageOverrides)
    quick: DemoQuickConfig = Field(default_factory=DemoQuickConfig)
    precompute_batch_size: int = Field(256, gt=0)


def load_demo_config(path: str | Path, overrides: Sequence[str] = (), *, quick: bool = False) -> DemoConfig:
    """Validate `path` + overrides; with `quick`, the file's own `quick.demo` overrides come before `overrides`."""
    from flowtrain.config import resolve_config, validate_config

    cfg = validate_config(resolve_config(path, overrides), DemoConfig)
    if quick and cfg.quick.demo:
        cfg = validate_config(resolve_config(path, [*cfg.quick.demo, *overrides]), DemoConfig)
    return cfg
