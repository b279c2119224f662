"""FLUX.2 Klein's part of `flowtrain autoencoder` (the training itself is generic: `flowtrain.autoencoder`).

build.py   which VAE: `AutoencoderKLFlux2` from the config's architecture, and the pixel multiple it needs
stats.py   fit the VAE BatchNorm latent statistics exactly as Klein normalises latents
"""
