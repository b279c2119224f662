"""The video demo's scorer: does a generated clip show the prompted digit, moving the prompted way?

- digit: each frame is cropped to a `digit_size` window centred on the ink's centroid and read by the image
  demo's classifier (`demo.score.DigitScorer`, an SVC on 8×8 grey levels), fitted on the real *training* digits
  drawn on the canvas and cropped the same way; the clip's digit is the majority over its frames.
- motion: the ink centroid of each frame, a least-squares line through them over time, and the displacement
  from the first to the last frame along it; the larger axis and its sign give the direction, and a displacement
  under `min_shift` pixels is "static" (which matches no prompt).
- joint: both right. All three go into demo_report.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from flowtrain.demo import score
from flowtrain.demo.video_data import DIRECTIONS, PAPER, render_clip

STATIC = "static"
# Darkness below the paper's (PAPER - grey) up to this is not ink: sampler noise on the paper must not pull the
# centroid towards the canvas centre.
INK_FLOOR = 32


def ink(frame: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8, dark ink on `PAPER` → (H, W) float ink weight ≥ 0 (noise on the paper floored)."""
    grey = frame.astype(np.float32).mean(axis=-1) if frame.ndim == 3 else frame.astype(np.float32)
    return np.maximum(PAPER - grey - INK_FLOOR, 0.0)


def centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the ink's centre of mass in pixels, None for a frame without ink."""
    w = ink(frame)
    total = float(w.sum())
    if total <= 0:
        return None
    ys, xs = np.indices(w.shape)
    return float((w * xs).sum() / total), float((w * ys).sum() / total)


def displacement(clip: np.ndarray) -> tuple[float, float] | None:
    """(F, H, W[, 3]) → the centroid's (dx, dy) from the first to the last frame of a least-squares line through
    the frames' centroids (robust to one bad frame); None when fewer than two frames have ink."""
    pts = [(t, c) for t, c in ((t, centroid(f)) for t, f in enumerate(clip)) if c is not None]
    if len(pts) < 2:
        return None
    t = np.array([p[0] for p in pts], dtype=np.float64)
    xy = np.array([p[1] for p in pts], dtype=np.float64)  # (n, 2)
    slope = np.polyfit(t, xy, 1)[0]  # (2,) pixels per frame
    return float(slope[0] * (len(clip) - 1)), float(slope[1] * (len(clip) - 1))


def motion_direction(clip: np.ndarray, min_shift: float = 4.0) -> str:
    """The direction, "left" / "right" / "up" / "down" (image y grows downwards), or "static" when the centroid
    moves less than `min_shift` pixels over the clip or no frame has ink."""
    d = displacement(clip)
    if d is None or max(abs(d[0]), abs(d[1])) < min_shift:
        return STATIC
    dx, dy = d
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def crop_at_centroid(frame: np.ndarray, digit_size: int) -> Image.Image:
    """The `digit_size` window centred on the ink centroid (clamped to the frame; the canvas centre when blank)."""
    h, w = frame.shape[:2]
    c = centroid(frame) or (w / 2, h / 2)
    x0 = int(np.clip(round(c[0] - digit_size / 2), 0, w - digit_size))
    y0 = int(np.clip(round(c[1] - digit_size / 2), 0, h - digit_size))
    return Image.fromarray(np.ascontiguousarray(frame[y0 : y0 + digit_size, x0 : x0 + digit_size]))


def frame_features(frames: Sequence[np.ndarray], digit_size: int) -> np.ndarray:
    """Frames → (N, 64) classifier features of their centroid crops."""
    return score.features([crop_at_centroid(f, digit_size) for f in frames])


def real_features(x8: np.ndarray, canvas: int, digit_size: int) -> np.ndarray:
    """(N, 8, 8) real digits, each drawn centred on the canvas → features after the same crop as generated
    frames get (so the classifier is fitted on what it will read)."""
    at = (canvas - digit_size) // 2
    frames = [render_clip(x, np.array([[at, at]]), canvas, digit_size)[0] for x in x8]
    return frame_features(frames, digit_size)


def fit_scorer(x8: np.ndarray, y: np.ndarray, canvas: int, digit_size: int) -> score.DigitScorer:
    return score.DigitScorer().fit(real_features(x8, canvas, digit_size), y)


def clip_digit(scorer: score.DigitScorer, clip: np.ndarray, digit_size: int) -> int:
    """The majority of the per-frame readings (a tie goes to the smaller digit)."""
    votes = scorer.predict(frame_features(list(clip), digit_size)).astype(int)
    return int(np.bincount(votes, minlength=10).argmax())


def video_adherence(
    digits_pred: Sequence[int],
    dirs_pred: Sequence[str],
    digits_prompted: Sequence[int],
    dirs_prompted: Sequence[str],
) -> dict:
    """Digit, motion and joint adherence (fractions of clips), per prompted digit and direction, and the motion
    confusion (rows: prompted direction; columns: the four directions then "static")."""
    dp, dt = np.asarray(digits_pred), np.asarray(digits_prompted)
    mp, mt = np.asarray(dirs_pred), np.asarray(dirs_prompted)
    digit_ok, motion_ok = dp == dt, mp == mt
    joint = digit_ok & motion_ok
    cols = [*DIRECTIONS, STATIC]
    return {
        "digit_adherence": float(digit_ok.mean()),
        "motion_adherence": float(motion_ok.mean()),
        "joint_adherence": float(joint.mean()),
        "per_digit_joint": {str(d): float(joint[dt == d].mean()) if (dt == d).any() else None for d in range(10)},
        "per_direction_joint": {d: float(joint[mt == d].mean()) if (mt == d).any() else None for d in DIRECTIONS},
        "motion_confusion": [[int(((mt == r) & (mp == c)).sum()) for c in cols] for r in DIRECTIONS],
        "motion_confusion_columns": cols,
    }
