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
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from flowtrain.data.fs import read_table
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
            table = read_table(self.raw_dir / shard["file"], columns=["caption", "image"])
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


class RawClipDataset(Dataset):
    """Map-style dataset over raw shards holding videos: the first `frames` frames of each video (precompute's
    `head` selection) as (3, F, R, R) in [-1, 1], each frame through `to_pixels`. Rows with fewer frames are left
    out (a clip of F frames needs F); images are one-frame clips, kept when `frames` is 1. Decoded clips are
    memoised when `cache_decoded`."""

    def __init__(self, raw_dir: str | Path, resolution: int, frames: int, *, cache_decoded: bool = True):
        from flowtrain.data.video import VIDEO_FORMATS, check_frames

        self.raw_dir, self.resolution, self.frames = Path(raw_dir), resolution, check_frames(frames, "data.frames")
        self._bytes: list[bytes] = []
        self._video: list[bool] = []
        self.captions: list[str] = []
        for shard in read_raw_manifest(self.raw_dir)["shards"]:
            table = read_table(self.raw_dir / shard["file"], columns=["caption", "image", "format", "num_frames"])
            for row in table.to_pylist():
                video = row["format"] in VIDEO_FORMATS
                # an image is a one-frame clip: with data.frames 1 (a causal 3-D VAE trained on images) it is one
                if (video and (row["num_frames"] or 0) >= frames) or (not video and frames == 1):
                    self._bytes.append(row["image"])
                    self._video.append(video)
                    self.captions.append(row["caption"])
        if not self._bytes:
            raise ValueError(f"{self.raw_dir}: the raw shards hold no video of at least data.frames={frames} frames")
        self._memo: dict[int, torch.Tensor] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self._bytes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._memo is not None and index in self._memo:
            return self._memo[index]
        from flowtrain.data.video import decode_frames

        if not self._video[index]:
            frames = [Image.open(io.BytesIO(self._bytes[index])).convert("RGB")]
        else:
            frames = decode_frames(self._bytes[index], range(self.frames))
        clip = torch.stack([to_pixels(f, self.resolution) for f in frames], dim=1)  # (3, F, R, R)
        if self._memo is not None:
            self._memo[index] = clip
        return clip


def raw_dataset(data: Any) -> Dataset:
    """The dataset an autoencoder config's `data:` section asks for: images, or clips when `data.frames` is set."""
    if getattr(data, "frames", None):
        return RawClipDataset(data.raw_dir, data.resolution, data.frames, cache_decoded=data.cache_decoded)
    return RawImageDataset(data.raw_dir, data.resolution, cache_decoded=data.cache_decoded)
