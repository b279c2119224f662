"""What the video demo leaves to look at: `samples.mp4` / `samples.gif` (all sampled clips tiled into one grid
video) and `samples.png` (one frame strip per clip, framed green when digit and motion both read as prompted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from flowtrain.demo.report import BAD, GOOD

VIDEO_REPORT_KEYS = (
    "joint_adherence",
    "digit_adherence",
    "motion_adherence",
    "per_digit_joint",
    "per_direction_joint",
    "motion_confusion",
    "classifier_test_accuracy",
    "target_adherence",
    "target_met",
    "samples",
    "stage_seconds",
    "stage_cpu_seconds",
    "total_seconds",
    "total_cpu_seconds",
    "final_losses",
    "paths",
)


def grid_frames(clips: list[np.ndarray], cols: int, pad: int = 2) -> list[Image.Image]:
    """Clips (each (F, H, W, 3) uint8, one F and size) tiled row-major: one grid image per frame index."""
    f, h, w = clips[0].shape[:3]
    rows = (len(clips) + cols - 1) // cols
    # sides rounded up to 16 (H.264's macroblock): the .mp4 writer would otherwise rescale the grid
    gh, gw = (-(-(rows * (h + pad) + pad) // 16) * 16, -(-(cols * (w + pad) + pad) // 16) * 16)
    out = []
    for t in range(f):
        canvas = np.full((gh, gw, 3), 128, np.uint8)
        for i, clip in enumerate(clips):
            r, c = divmod(i, cols)
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = clip[t]
        out.append(Image.fromarray(canvas))
    return out


def strips_image(clips: list[np.ndarray], labels: list[str], ok: list[bool], scale: int = 2) -> Image.Image:
    """One row per clip: its frames side by side (scaled up `scale`×), framed green / red by `ok`, the prompt's
    short label at the left."""
    f, h, w = clips[0].shape[:3]
    cw, ch = w * scale, h * scale
    frame, pad, label_w = 2, 2, 90
    row_h = ch + 2 * frame + pad
    img = Image.new("RGB", (label_w + f * cw + 2 * frame, len(clips) * row_h), "white")
    draw = ImageDraw.Draw(img)
    for i, (clip, label, good) in enumerate(zip(clips, labels, ok, strict=True)):
        y0 = i * row_h
        draw.text((2, y0 + ch // 2 - 4), label, fill="black")
        draw.rectangle([label_w, y0, label_w + f * cw + 2 * frame - 1, y0 + ch + 2 * frame - 1],
                       fill=GOOD if good else BAD)  # fmt: skip
        for t in range(f):
            im = Image.fromarray(clip[t]).resize((cw, ch), Image.Resampling.NEAREST)
            img.paste(im, (label_w + frame + t * cw, y0 + frame))
    return img


def write_samples(out: Path, clips: list[np.ndarray], labels: list[str], ok: list[bool], cols: int, fps: int) -> dict:
    """samples.mp4 (diffusers' export_to_video), samples.gif and samples.png into `out`; returns their paths."""
    from diffusers.utils import export_to_video

    from flowtrain.media import write_preview

    frames = grid_frames(clips, cols)
    mp4 = export_to_video(frames, str(out / "samples.mp4"), fps=fps)
    gif = write_preview(frames, out / "samples.gif", fps)
    strips_image(clips, labels, ok).save(out / "samples.png")
    return {"samples_video": str(mp4), "samples_gif": str(gif), "samples": str(out / "samples.png")}


def check_video_report(report: dict[str, Any]) -> list[str]:
    """Problems with a video demo report's shape (empty when well-formed)."""
    problems = [f"missing key {k!r}" for k in VIDEO_REPORT_KEYS if k not in report]
    if problems:
        return problems
    for key in ("joint_adherence", "digit_adherence", "motion_adherence", "classifier_test_accuracy"):
        if not 0.0 <= report[key] <= 1.0:
            problems.append(f"{key} = {report[key]} not in [0, 1]")
    if report["joint_adherence"] > min(report["digit_adherence"], report["motion_adherence"]):
        problems.append("joint adherence above digit or motion adherence")
    if sorted(report["per_digit_joint"]) != [str(d) for d in range(10)]:
        problems.append("per_digit_joint must have keys '0'..'9'")
    return problems
