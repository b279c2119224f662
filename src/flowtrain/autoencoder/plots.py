"""`graphs/autoencoder_losses.png`: one panel per loss term the run logged (rec, KL, perceptual, G, D, R1, ...),
raw and smoothed, next to the generic graphs `flowtrain.track.plots` writes (loss, lr, throughput)."""

from __future__ import annotations

from pathlib import Path

from flowtrain.track.jsonl import read_metrics
from flowtrain.track.plots import series, smoothing_beta
from flowtrain.track.series import smooth

TERMS = (
    ("rec", "reconstruction"),
    ("kl", "KL (per pixel value)"),
    ("kl_raw", "KL without free bits"),
    ("perceptual", "perceptual"),
    ("g", "generator (G)"),
    ("g_weight", "adaptive G weight"),
    ("d", "discriminator (D)"),
    ("r1", "R1 penalty"),
)


def plot_losses(run_dir: str | Path) -> Path | None:
    """Write the panels for the terms present in `run_dir/logs/metrics.jsonl`; returns the file (None: no rows)."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "logs" / "metrics.jsonl")
    panels = [(name, *series(rows, key)) for key, name in TERMS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig = Figure(figsize=(9, 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (name, steps, values) in zip(axes, panels, strict=True):
        ax.plot(steps, values, lw=0.8, alpha=0.35)
        ax.plot(steps, smooth(values, smoothing_beta(len(values))), lw=1.8)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title("autoencoder losses")
    path = run_dir / "graphs" / "autoencoder_losses.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
