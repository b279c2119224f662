"""Wan 2.1 / 2.2 text-to-video (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` and kin): `WanPipeline`, UMT5 text encoder,
`AutoencoderKLWan`, `WanTransformer3DModel` (and `transformer_2`, the low-noise expert of Wan 2.2 A14B).

    options.py      the `model:` keys (max_sequence_length, num_frames, fps, expert)
    family.py       the `ModelFamily` implementation (exact against the pipeline, in fp32)
    latents.py      5-D latents ↔ tokens, normalisation, text padding, expert σ ranges (pure)
    tiny.py         tiny random pipelines (one transformer, or two experts) for tests and demos (offline)

This module stays torch-free: the config layer imports it for `Options`. docs/models/wan.md has the facts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowtrain.models.wan.options import WanOptions as Options

if TYPE_CHECKING:
    from flowtrain.models.base import ModelFamily

PIPELINE_CLASSES = ("WanPipeline",)


def load_family() -> ModelFamily:
    from flowtrain.models.wan.family import Wan

    return Wan()


__all__ = ["Options", "PIPELINE_CLASSES", "load_family"]
