"""Kept for imports written before the trainer became generic: the data set lives in `flowtrain.autoencoder.data`."""

from flowtrain.autoencoder.data import RawImageDataset, to_pixels

__all__ = ["RawImageDataset", "to_pixels"]
