"""FLUX.1's part of `flowtrain autoencoder` (the training itself is generic: `flowtrain.autoencoder`).

build.py   which VAE (`AutoencoderKL` as FLUX.1 configures it) and the pixel multiple it needs; after training,
           fit the shift / scaling factors FLUX.1 normalises latents with
"""
