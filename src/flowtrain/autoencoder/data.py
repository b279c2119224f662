"""Images of `flowtrain prepare`'s raw shards as VAE inputs: (3, R, R) float tensors in [-1, 1].

A batch is (B, 3, R, R); the training loop only assumes (B, 3, ...), so a video data set yielding (3, F, R, R)
clips can be added here without touching it.

Preprocessing: resize so the short side is R (Lanczos, only when it differs), centre crop to R×R, scale to [-1, 1].
For images already R×R (the demo's) this is exactly what `flowtrain precompute` feeds the VAE. (Note: diffusers'
`Flux2ImageProcessor._resize_and_crop`, which precompute goes through, only centre-crops and never resizes; this
module resizes first, as the name promises.)
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from flowtrain.data.precompute import read_raw_manifest


class RawImageDataset(Dataset):
    """Map-style dataset over the raw shards. Encoded bytes stay in memory (they are what the shards hold);
    decoded tensors are memoised too when `cache_decoded` (small images: decoding dominates otherwise)."""

    def __init__(self, raw_dir: str | Path, resolution: int, *, cache_decoded: bool = True):
        self.raw_dir = Path(raw_dir)
        manifest = read_raw_manifest(self.raw_dir)
        self._bytes: list[bytes] = []
        self.captions: list[str] = []
        for shard in manifest["shards"]:
            table = pq.read_table(self.raw_dir / shard["file"], columns=["caption", "image"])
            self._bytes += table.column("image").to_pylist()
            self.captions += table.column("caption").to_pylist()
        if not self._bytes:
            raise ValueError(f"{self.raw_dir}: the raw shards hold no images")
        self.resolution = resolution
        self._memo: dict[int, torch.Tensor] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self._bytes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._memo is not None and index in self._memo:
            return self._memo[index]
        image = Image.open(io.BytesIO(self._bytes[index])).convert("RGB")
        pixels = to_pixels(image, self.resolution)
        if self._memo is not None:
            self._memo[index] = pixels
        return pixels


def to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image → (3, R, R) float32 in [-1, 1]: resize to cover (short side R), centre crop."""
    w, h = image.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        image = image.resize(
            (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.LANCZOS
        )
        w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)
