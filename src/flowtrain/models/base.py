"""The plug-in point between the generic stages and one model family."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from flowtrain.registry import Registry


class ModelPathError(FileNotFoundError):
    """A model path that is clearly local but missing or not a model folder; its message is complete as is."""


class ModelAdapter(Protocol):
    """What `precompute`, `train` and `sample` need from a model family.

    Precompute side: `load_pipeline`, `encode_prompts`, `encode_images`.
    Train side (cache only, no VAE / text encoder): `training_latents`, `load_transformer`, `predict`,
    `lora_target_modules`, `save_lora`.
    Validation side (sampling during training): `load_pipeline`, `encode_prompts`, `pixel_multiple`, `sample`.
    """

    family: str

    def load_pipeline(self, pretrained: str, *, dtype: torch.dtype, with_transformer: bool = False, **kw) -> Any: ...

    def encode_prompts(self, pipe: Any, prompts: list[str], *, layers: list[int], max_length: int) -> torch.Tensor:
        """(B, L, D) prompt embeddings, exactly as the reference pipeline computes them."""
        ...

    def encode_images(self, pipe: Any, images: list, *, resolution: int) -> torch.Tensor:
        """(B, 2C, h, w) VAE posterior moments (mean ‖ logvar)."""
        ...


MODELS: Registry[type] = Registry("model family")


def get_adapter(family: str) -> Any:
    """Instantiate the adapter registered under `family` (or an import string `pkg.mod:Class`)."""
    return MODELS.get(family)()
