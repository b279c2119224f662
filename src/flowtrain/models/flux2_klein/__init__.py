"""FLUX.2 Klein (4B / 9B base): `Flux2KleinPipeline`, Qwen3 text encoder, `AutoencoderKLFlux2`.

    options.py      the `model:` keys (text-encoder layers, sequence length)
    family.py       the `ModelFamily` implementation (exact against the pipeline)
    latents.py      patchify / pack / normalise and position ids (pure)
    shift.py        FLUX.2's empirical resolution shift μ
    tiny.py         a tiny random pipeline for tests and the demo (offline)
    scratch.py      a pipeline folder with a trained VAE and a fresh transformer (training from scratch)
    autoencoder/    `flowtrain autoencoder`: train an AutoencoderKLFlux2 and fit its latent statistics

This module stays torch-free: the config layer imports it for `Options`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowtrain.models.flux2_klein.options import Flux2KleinOptions as Options

if TYPE_CHECKING:
    from flowtrain.models.base import ModelFamily

PIPELINE_CLASSES = ("Flux2KleinPipeline",)


def load_family() -> ModelFamily:
    from flowtrain.models.flux2_klein.family import Flux2Klein

    return Flux2Klein()


__all__ = ["Options", "PIPELINE_CLASSES", "load_family"]
