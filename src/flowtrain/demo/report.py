"""What the demo leaves for a person to look at: `samples.png`, `loss_curve.png` and `demo_report.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from flowtrain.track.jsonl import read_metrics
from flowtrain.track.plots import series, smooth, smoothing_beta

GOOD, BAD = (40, 170, 60), (215, 40, 40)


def samples_grid(
    images: list[Image.Image], labels: list[int], predicted: list[int], per_row: int, scale: int = 4
) -> Image.Image:
    """One row per prompted digit (label at the left); each cell framed green when the scorer read the prompted
    digit, red otherwise. `images` in (digit, k) order, `per_row` images per digit."""
    w, h = images[0].size
    cw, ch = w * scale, h * scale
    pad, frame, label_w = 2, 2, 20
    rows = (len(images) + per_row - 1) // per_row
    grid = Image.new("RGB", (label_w + per_row * (cw + 2 * frame + pad), rows * (ch + 2 * frame + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, y, p) in enumerate(zip(images, labels, predicted, strict=True)):
        r, c = divmod(i, per_row)
        x0 = label_w + c * (cw + 2 * frame + pad)
        y0 = r * (ch + 2 * frame + pad)
        if c == 0:
            draw.text((4, y0 + ch // 2 - 4), str(y), fill="black")
        draw.rectangle([x0, y0, x0 + cw + 2 * frame - 1, y0 + ch + 2 * frame - 1], fill=GOOD if p == y else BAD)
        grid.paste(im.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST), (x0 + frame, y0 + frame))
    return grid


def loss_curve(runs: dict[str, tuple[Path, str]], path: Path) -> Path:
    """One panel per stage: `runs` maps a title to (run dir with logs/metrics.jsonl, metric key)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, (title, (run_dir, key)) in zip(axes, runs.items(), strict=True):
        metrics = run_dir / "logs" / "metrics.jsonl"
        rows = read_metrics(metrics) if metrics.exists() else []
        steps, values = series(rows, key)
        if values:
            ax.plot(steps, values, lw=0.8, alpha=0.35, label=key)
            ax.plot(steps, smooth(values, smoothing_beta(len(values))), lw=1.8, label="smoothed")
            if min(values) > 0:
                ax.set_yscale("log")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def write_report(path: Path, report: dict[str, Any]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


REPORT_KEYS = (
    "prompt_adherence",
    "per_digit_adherence",
    "classifier_test_accuracy",
    "target_adherence",
    "target_met",
    "samples",
    "stage_seconds",
    "total_seconds",
    "final_losses",
)


def check_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's shape (empty when well-formed); used by the tests and the benchmark."""
    problems = [f"missing key {k!r}" for k in REPORT_KEYS if k not in report]
    if problems:
        return problems
    for key in ("prompt_adherence", "classifier_test_accuracy"):
        if not 0.0 <= report[key] <= 1.0:
            problems.append(f"{key} = {report[key]} not in [0, 1]")
    if sorted(report["per_digit_adherence"]) != [str(d) for d in range(10)]:
        problems.append("per_digit_adherence must have keys '0'..'9'")
    for stage, sec in report["stage_seconds"].items():
        if not sec >= 0:
            problems.append(f"stage_seconds[{stage!r}] = {sec}")
    return problems
