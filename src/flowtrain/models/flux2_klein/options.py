"""FLUX.2 Klein's `model:` keys."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowtrain.config.model import ModelOptions


class Flux2KleinOptions(ModelOptions):
    family: Literal["flux2_klein"] = Field("flux2_klein", description="FLUX.2 Klein (4B / 9B base).")
    text_encoder_layers: list[int] = Field(
        default_factory=lambda: [9, 18, 27],
        min_length=1,
        description="Qwen3 hidden-state indices stacked into the prompt embedding: (9, 18, 27), as "
        "Flux2KleinPipeline does (not the (10, 20, 30) of diffusers' Klein training script).",
    )
    max_sequence_length: int = Field(
        512, gt=0, description="Text tokens per prompt: the pipeline pads every prompt to it; must match the cache."
    )
    shift_reference_steps: int = Field(
        50,
        gt=0,
        description="timesteps.shift_mode resolution: FLUX.2's shift μ depends on the inference step count too; "
        "training takes it at this many steps (the Klein base pipeline's default).",
    )
