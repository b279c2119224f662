"""The `model:` section of a FLUX.1 config (torch-free: the config layer imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowtrain.config.model import ModelOptions

# FluxPipeline.check_inputs refuses more: T5 prompts are at most 512 tokens for FLUX.1.
MAX_SEQUENCE_LENGTH = 512
# diffusers' examples/dreambooth/train_dreambooth_lora_flux.py `--guidance_scale` default (also the pipeline's
# inference default): the value fed to FLUX.1-dev's guidance embedding at every training step.
REFERENCE_TRAINING_GUIDANCE = 3.5


class Flux1Options(ModelOptions):
    """FLUX.1 (`FluxPipeline`: CLIP-L pooled + T5-XXL, guidance-distilled dev / timestep-distilled schnell)."""

    family: Literal["flux1"] = Field(
        "flux1", description="FLUX.1 (FluxPipeline: FLUX.1-dev, FLUX.1-schnell and fine-tunes in diffusers layout)."
    )
    max_sequence_length: int = Field(
        MAX_SEQUENCE_LENGTH,
        gt=0,
        le=MAX_SEQUENCE_LENGTH,
        description="T5 tokens per prompt: every prompt is padded (no mask reaches the transformer) or truncated to "
        "this; the cache stores all of them, so it must match the cache. 512 is the pipeline's default.",
    )
    guidance: float = Field(
        REFERENCE_TRAINING_GUIDANCE,
        ge=0.0,
        description="Training value of the guidance embedding of guidance-distilled checkpoints (FLUX.1-dev: "
        "transformer config guidance_embeds=true); ignored by checkpoints without one (schnell). 3.5 is the "
        "diffusers training script's default; 1.0 is the common alternative (kohya sd-scripts' recommended "
        "setting, SimpleTuner, x-flux). Sampling uses its own guidance_scale.",
    )
