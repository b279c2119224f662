"""Qwen-Image (`Qwen/Qwen-Image`): `QwenImagePipeline`, Qwen2.5-VL text encoder, `AutoencoderKLQwenImage`,
`QwenImageTransformer2DModel`.

    options.py      the `model:` keys (max_sequence_length)
    family.py       the `ModelFamily` implementation (exact against the pipeline, in fp32)
    latents.py      5-D latents ↔ packed 64-channel tokens, normalisation, img_shapes (pure)
    tiny.py         a tiny random pipeline for tests and demos (offline)

This module stays torch-free: the config layer imports it for `Options`. docs/models/qwen_image.md has the facts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowtrain.models.qwen_image.options import QwenImageOptions as Options

if TYPE_CHECKING:
    from flowtrain.models.base import ModelFamily

PIPELINE_CLASSES = ("QwenImagePipeline",)


def load_family() -> ModelFamily:
    from flowtrain.models.qwen_image.family import QwenImage

    return QwenImage()


__all__ = ["Options", "PIPELINE_CLASSES", "load_family"]
