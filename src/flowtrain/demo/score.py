"""The demo's scorer: does a generated image show the digit its prompt asked for?

A scikit-learn SVC is fitted on the real *training* digits after the same round trip a generated image takes:
8×8 levels → the demo's RGB PNG → grey → 8×8 by area averaging → levels 0..16 (ink = 16). Its accuracy on the
held-out real digits (same preparation) is the ceiling a perfect generator could reach. Prompt adherence is the
fraction of generated images it labels as the prompted digit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from flowtrain.demo.digits import MAX_LEVEL, digit_image


def features(images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images (any size, any mode) → (N, 64) float32 levels in [0, 16], ink high: the `load_digits` layout."""
    rows = []
    for im in images:
        grey = im.convert("L").resize((8, 8), Image.Resampling.BOX)  # BOX = mean over each pixel's footprint
        rows.append((255.0 - np.asarray(grey, dtype=np.float32)) * (MAX_LEVEL / 255.0))
    return np.stack(rows).reshape(len(rows), 64)


def real_features(x8: np.ndarray, size: int) -> np.ndarray:
    """(N, 8, 8) real digits → features after the round trip through the demo's `size`px images."""
    return features([digit_image(x, size) for x in x8])


class DigitScorer:
    """SVC (RBF) on 64 grey levels; ~99% on held-out real digits."""

    def __init__(self, c: float = 10.0, seed: int = 0):
        from sklearn.svm import SVC

        self.model = SVC(C=c, gamma="scale", random_state=seed)

    def fit(self, x: np.ndarray, y: np.ndarray) -> DigitScorer:
        self.model.fit(x, y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == y).mean())


def adherence(predicted: np.ndarray, prompted: np.ndarray) -> dict:
    """Overall and per-digit fraction of generated images classified as the prompted digit, and the confusion."""
    per_digit = {}
    confusion = np.zeros((10, 10), dtype=int)
    for p, t in zip(predicted, prompted, strict=True):
        confusion[int(t), int(p)] += 1
    for d in range(10):
        n = int(confusion[d].sum())
        per_digit[str(d)] = float(confusion[d, d] / n) if n else None
    return {
        "accuracy": float((predicted == prompted).mean()),
        "per_digit": per_digit,
        "confusion": confusion.tolist(),  # rows: prompted digit, columns: classified as
    }
