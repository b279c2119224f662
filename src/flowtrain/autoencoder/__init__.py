"""Autoencoder training, generic over model families (`flowtrain autoencoder CONFIG`; docs/autoencoder.md).

config.py         AutoencoderConfig (own pydantic schema) and its loader
data.py           raw shards → (3, R, R) pixels in [-1, 1]
losses.py         pure loss terms: reconstruction, KL with free bits, β warm-up, hinge / non-saturating GAN,
                  the adaptive generator weight, R1
discriminator.py  the patch discriminator
perceptual.py     a perceptual distance on a transformers vision backbone (LPIPS needs torchvision: see there)
step.py           one step as two halves with disjoint gradients (autoencoder, discriminator)
train.py          the loop: EMA, checkpoints with exact resume, samples, logging; `train_autoencoder`
samples.py        reconstruction grids;  plots.py  one graph panel per loss term
reference.py      docs/autoencoder.md's option table, generated from the schema

The family says only which VAE and what it fits afterwards (`models.base.TrainsAutoencoder`).
"""

from flowtrain.autoencoder.config import AutoencoderConfig, load_autoencoder_config
from flowtrain.autoencoder.train import AutoencoderResult, train_autoencoder

__all__ = ["AutoencoderConfig", "AutoencoderResult", "load_autoencoder_config", "train_autoencoder"]
