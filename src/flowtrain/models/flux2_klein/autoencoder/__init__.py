"""Autoencoder training: the VAE a from-scratch Klein pipeline needs (`flowtrain autoencoder CONFIG`).

config.py  AutoencoderConfig (own pydantic schema, loaded with the training config's YAML machinery)
data.py    raw shards → (3, R, R) pixels in [-1, 1]
train.py   reconstruction + β-KL (linear warm-up) with AdamW, JSONL metrics, progress bar, `save_pretrained`
stats.py   fit the VAE BatchNorm latent statistics exactly as Klein normalises latents
"""

from flowtrain.models.flux2_klein.autoencoder.config import AutoencoderConfig, load_autoencoder_config

__all__ = ["AutoencoderConfig", "load_autoencoder_config"]
