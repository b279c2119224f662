"""Kept for imports written before the trainer became generic: the config lives in `flowtrain.autoencoder.config`."""

from flowtrain.autoencoder.config import (
    AEDataConfig,
    AELossConfig,
    AEModelConfig,
    AutoencoderConfig,
    dump_autoencoder_config,
    load_autoencoder_config,
)

__all__ = [
    "AEDataConfig",
    "AELossConfig",
    "AEModelConfig",
    "AutoencoderConfig",
    "dump_autoencoder_config",
    "load_autoencoder_config",
]
