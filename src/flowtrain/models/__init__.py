"""Model adapters: everything family-specific (loading, encoding, packing, forward, LoRA targets) lives here."""

from flowtrain.models.base import MODELS, ModelAdapter, get_adapter

# Importing a module registers its adapter.
from flowtrain.models import flux2_klein  # noqa: E402,F401  isort: skip

__all__ = ["MODELS", "ModelAdapter", "get_adapter"]
