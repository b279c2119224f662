"""Qwen-Image's `model:` keys (torch-free: the config layer imports this)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowtrain.config.model import ModelOptions


class QwenImageOptions(ModelOptions):
    family: Literal["qwen_image"] = Field(
        "qwen_image",
        description="Qwen-Image (QwenImagePipeline: Qwen2.5-VL-7B text encoder, AutoencoderKLQwenImage, 20B MMDiT).",
    )
    max_sequence_length: int = Field(
        512,
        gt=0,
        le=1024,
        description="Text tokens kept per prompt after the pipeline drops its 34 template tokens (encode_prompt's "
        "`prompt_embeds[:, :max_sequence_length]`). 512 is QwenImagePipeline.__call__'s default, so training sees "
        "what sampling sees; the pipeline refuses more than 1024. The cache stores each prompt at its own length (at "
        "most this), not padded to it; must match the cache.",
    )
