"""Kept for imports written before the trainer became generic (`flowtrain.autoencoder`); `build_vae` is Klein's."""

from flowtrain.autoencoder.losses import kl_beta
from flowtrain.autoencoder.train import AutoencoderResult, train_autoencoder
from flowtrain.models.flux2_klein.autoencoder.build import build_vae

__all__ = ["AutoencoderResult", "build_vae", "kl_beta", "train_autoencoder"]
