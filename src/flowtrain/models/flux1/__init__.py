"""FLUX.1 (`FluxPipeline`): CLIP-L pooled + T5 text conditioning, guidance embedding, 16-channel VAE packed 2×2.

    options.py      the `model:` keys (T5 sequence length, training guidance)
    family.py       the `ModelFamily` implementation (exact against the pipeline)
    latents.py      pack / normalise and position ids (pure)
    tiny.py         a tiny random pipeline for tests and demos (offline)

This module stays torch-free: the config layer imports it for `Options`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowtrain.models.flux1.options import Flux1Options as Options

if TYPE_CHECKING:
    from flowtrain.models.base import ModelFamily

PIPELINE_CLASSES = ("FluxPipeline",)


def load_family() -> ModelFamily:
    from flowtrain.models.flux1.family import Flux1

    return Flux1()


__all__ = ["Options", "PIPELINE_CLASSES", "load_family"]
