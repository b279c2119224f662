"""The video demo's data set: scikit-learn's real handwritten digits moving across a small canvas.

Each training digit (8×8, 16 grey levels) is drawn dark on light grey at `digit_size`×`digit_size` by pixel
replication and moved in a straight line across a `canvas`×`canvas` frame, one of four directions, for `frames`
frames; the caption names both: "a handwritten digit seven moving left". Written as real .mp4 files (H.264
through PyAV, `flowtrain.data.video.write_video`) with same-name .txt captions: the folder `flowtrain prepare`
reads, so the demo goes through the product's own video path.

Everything that decides what a clip shows is a pure function here (`trajectory`, `caption_for`, `render_clip`),
so the tests check it without writing files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowtrain.demo.digits import DIGIT_NAMES, MAX_LEVEL

DIRECTIONS = ("left", "right", "up", "down")
# Unit steps in image coordinates (x to the right, y downwards): "up" is towards row 0.
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DEFAULT_TEMPLATE = "a handwritten digit {name} moving {direction}"
# Grey levels of the paper and of full ink. AutoencoderKLWan clamps its decoded pixels to [-1, 1]: with white paper
# (+1) the decoder overshoots the bound with zero gradient and stalls at a blank page (measured: reconstruction L1
# stuck at 0.15, the ink's share); light-grey paper still left it learning the page's level for 100+ steps. Mid-grey
# paper is pixel value ~0, where a fresh decoder starts, so it learns the ink from the first steps; ink stays
# inside the bound too.
PAPER, INK = 128, 16


def caption_for(label: int, direction: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The caption, e.g. "a handwritten digit seven moving left"; `{digit}` in the template is the numeral."""
    if direction not in DIRECTION_VECTORS:
        raise ValueError(f"direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    return template.format(name=DIGIT_NAMES[label], digit=label, direction=direction)


def trajectory(direction: str, frames: int, canvas: int, digit_size: int, offset: int | None = None) -> np.ndarray:
    """Top-left corners (x, y) of the digit in each frame: (frames, 2) int.

    The digit crosses the whole free span `canvas - digit_size` along the direction's axis, from one edge to the
    other, at an even pace (positions rounded to whole pixels); across the other axis it stays at `offset`
    (default: centred). Every position keeps the digit wholly on the canvas."""
    if direction not in DIRECTION_VECTORS:
        raise ValueError(f"direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    span = canvas - digit_size
    if span < 0:
        raise ValueError(f"digit_size {digit_size} does not fit on a {canvas}px canvas")
    if frames < 2:
        raise ValueError(f"frames={frames}: a motion needs at least 2 frames")
    across = span // 2 if offset is None else offset
    if not 0 <= across <= span:
        raise ValueError(f"offset {offset} puts the digit off the canvas (0..{span})")
    along = np.rint(np.linspace(0, span, frames)).astype(int)
    dx, dy = DIRECTION_VECTORS[direction]
    if dx < 0 or dy < 0:
        along = along[::-1]  # left / up: start at the far edge
    xy = np.empty((frames, 2), dtype=int)
    xy[:, 0] = along if dx else across
    xy[:, 1] = along if dy else across
    return xy


def digit_pixels(x8: np.ndarray, digit_size: int) -> np.ndarray:
    """(8, 8) levels in [0, 16] → (digit_size, digit_size) uint8 grey from `PAPER` (level 0) to `INK` (level 16),
    by pixel replication (as the image demo's `digit_image`)."""
    if digit_size % x8.shape[0]:
        raise ValueError(f"digit_size {digit_size} must be a multiple of {x8.shape[0]}")
    grey = np.rint(PAPER - x8 * ((PAPER - INK) / MAX_LEVEL)).astype(np.uint8)
    k = digit_size // x8.shape[0]
    return np.kron(grey, np.ones((k, k), dtype=np.uint8))


def render_clip(x8: np.ndarray, positions: np.ndarray, canvas: int, digit_size: int) -> np.ndarray:
    """The digit drawn at each top-left position on a `PAPER` canvas: (F, canvas, canvas, 3) uint8 RGB."""
    patch = digit_pixels(x8, digit_size)
    clip = np.full((len(positions), canvas, canvas), PAPER, dtype=np.uint8)
    for f, (x, y) in enumerate(positions):
        if x < 0 or y < 0 or x + digit_size > canvas or y + digit_size > canvas:
            raise ValueError(f"frame {f}: the digit at ({x}, {y}) leaves the {canvas}px canvas")
        clip[f, y : y + digit_size, x : x + digit_size] = patch
    return np.repeat(clip[..., None], 3, axis=-1)


def assign_directions(n: int, seed: int = 0) -> np.ndarray:
    """A direction index per clip: balanced (each direction n/4 times, ±1) and shuffled with `seed`."""
    idx = np.arange(n) % len(DIRECTIONS)
    np.random.default_rng(seed).shuffle(idx)
    return idx


def write_video_folder(
    out: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    frames: int = 9,
    canvas: int = 32,
    digit_size: int = 16,
    fps: int = 8,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    progress: bool = False,
) -> list[tuple[int, str]]:
    """`{out}/{i:04d}.mp4` + `.txt` per digit (a direction each, balanced); returns [(label, direction)]."""
    from flowtrain.data.video import write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = assign_directions(len(labels), seed)
    written: list[tuple[int, str]] = []
    items = zip(images, labels, dirs, strict=True)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(labels), desc="video clips", unit="clip")
    for i, (x8, y, d) in enumerate(items):
        direction = DIRECTIONS[int(d)]
        clip = render_clip(x8, trajectory(direction, frames, canvas, digit_size), canvas, digit_size)
        write_video(out / f"{i:04d}.mp4", clip, fps=fps)
        (out / f"{i:04d}.txt").write_text(caption_for(int(y), direction, template), encoding="utf-8")
        written.append((int(y), direction))
    return written
