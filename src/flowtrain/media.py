"""Writing what a sampler returns: an image (PIL) or a video (a list of PIL frames, as text-to-video pipelines return
with `output_type="pil"`).

A video becomes three files: `NAME.mp4` through diffusers' `export_to_video` (imageio-ffmpeg), a small animated
`NAME.gif` preview that any browser or tracker shows inline, and `NAME.png`, the frames side by side (a strip), so
image grids, trackers' image panels and tests that look at PNGs work for videos unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

PREVIEW_SIDE = 256  # the GIF preview's longest side at most (pixels): small enough to attach to every validation
DEFAULT_FPS = 16  # when the sampler's options carry no `model.fps` of their own


def is_video(sample: Any) -> bool:
    """A list / tuple of frames (one sample of a video pipeline) rather than one image."""
    return isinstance(sample, (list, tuple))


def frame_strip(frames: list[Image.Image]) -> Image.Image:
    """Frames (equal sizes) side by side, left to right, as one image."""
    w, h = frames[0].size
    strip = Image.new("RGB", (w * len(frames), h), "white")
    for i, frame in enumerate(frames):
        strip.paste(frame.convert("RGB"), (i * w, 0))
    return strip


def still(sample: Any) -> Image.Image:
    """The image to show for a sample: an image itself, a video's frame strip."""
    return frame_strip(list(sample)) if is_video(sample) else sample


def write_preview(frames: list[Image.Image], path: Path, fps: int) -> Path:
    """An animated GIF (looping) of the frames, scaled down to at most `PREVIEW_SIDE` pixels."""
    w, h = frames[0].size
    scale = min(1.0, PREVIEW_SIDE / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = [f.convert("RGB").resize(size, Image.Resampling.LANCZOS) if scale < 1 else f.convert("RGB") for f in frames]
    small[0].save(path, save_all=True, append_images=small[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path


def save_sample(sample: Any, path: str | Path, fps: int = DEFAULT_FPS) -> list[Path]:
    """Write one sample to `path` (a .png): an image as is; a video as `path` (its frame strip) plus the .mp4 and
    the .gif preview beside it. Returns the files written, the PNG first."""
    from diffusers.utils import export_to_video

    path = Path(path)
    if not is_video(sample):
        sample.save(path)
        return [path]
    frames = list(sample)
    frame_strip(frames).save(path)
    mp4 = export_to_video(frames, str(path.with_suffix(".mp4")), fps=fps)
    return [path, Path(mp4), write_preview(frames, path.with_suffix(".gif"), fps)]


def sample_fps(model: Any) -> int:
    """The frame rate a model's options ask videos to be written at (`fps`), else `DEFAULT_FPS`."""
    return int(getattr(model, "fps", DEFAULT_FPS))
