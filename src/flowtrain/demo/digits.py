"""The demo's data set: scikit-learn's `load_digits` (1,797 real handwritten digits, 8×8, 16 grey levels).

Each digit becomes an RGB PNG (dark ink on white, upscaled by pixel replication to `size`×`size`) with the caption
"a handwritten digit seven", written as a folder `flowtrain prepare` reads (image + same-name .txt). A stratified,
seeded split holds out a test set that nothing but the scorer's ceiling ever sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_LEVEL = 16  # load_digits pixel values are 0..16


def caption_for(label: int, template: str = "a handwritten digit {name}") -> str:
    return template.format(name=DIGIT_NAMES[label], digit=label)


@dataclass
class DigitsSplit:
    """8×8 digits as float arrays in [0, 16] (ink = 16) with labels, split into train / test."""

    train_x: np.ndarray  # (N, 8, 8)
    train_y: np.ndarray  # (N,)
    test_x: np.ndarray
    test_y: np.ndarray


def load_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Stratified split of the 1,797 digits (the same split for the same seed on every machine)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return DigitsSplit(x_tr.astype(np.float32), y_tr.astype(np.int64), x_te.astype(np.float32), y_te.astype(np.int64))


def digit_image(x8: np.ndarray, size: int) -> Image.Image:
    """(8, 8) levels in [0, 16] → RGB PIL image `size`×`size`, dark ink on white, each pixel a (size/8)² block."""
    if size % x8.shape[0]:
        raise ValueError(f"image size {size} must be a multiple of {x8.shape[0]}")
    grey = np.rint(255.0 - x8 * (255.0 / MAX_LEVEL)).astype(np.uint8)
    im = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.NEAREST)
    return im.convert("RGB")


def write_folder(
    out: str | Path, images: np.ndarray, labels: np.ndarray, size: int, template: str = "a handwritten digit {name}"
) -> Path:
    """`{out}/{i:04d}.png` + `{out}/{i:04d}.txt` (caption) for each digit; returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (x8, y) in enumerate(zip(images, labels, strict=True)):
        digit_image(x8, size).save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(caption_for(int(y), template), encoding="utf-8")
    return out
