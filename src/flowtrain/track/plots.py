"""`flowtrain plot RUN_DIR`: PNG graphs and a summary from `{run_dir}/logs/metrics.jsonl` into `{run_dir}/graphs/`.

Also run automatically at the end of training. Uses matplotlib's object API with the Agg canvas (no pyplot), so it
never touches the global backend of a notebook or GUI that imports flowtrain.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flowtrain.track.jsonl import read_metrics
from flowtrain.track.series import sigma_bin_names, smooth

METRICS_FILE = Path("logs") / "metrics.jsonl"


def smoothing_beta(n: int) -> float:
    """EMA factor for a series of n points: ~10 points of memory, at most 0.99."""
    return min(0.99, max(0.0, 1.0 - 10.0 / max(n, 1)))


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that have a finite value for it."""
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def _figure(nrows: int = 1, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, 1, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    return fig, axes


def warm_up() -> None:
    """Draw one small figure into memory: matplotlib's first drawing loads fonts and modules (~0.5 s here), which
    the MLflow child does while training leaves it idle rather than at the end of the run."""
    import io

    fig, (ax,) = _figure(height=1.0)
    ax.plot([0, 1], [1, 0], label="loss")
    ax.set_title("warm-up")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png", dpi=20)


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.savefig(path, dpi=100)
    written.append(path)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the graphs and `summary.txt`; returns the files written. Graphs without data are skipped."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a flowtrain run dir (output_dir of `train`)?")
    rows = read_metrics(metrics)
    if not rows:
        raise ValueError(f"{metrics} has no rows yet: nothing to plot")
    out = run_dir / "graphs"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    steps, loss = series(rows, "loss")
    if loss:
        fig, (ax,) = _figure()
        ax.plot(steps, loss, lw=0.8, alpha=0.35, label="loss")
        ax.plot(steps, smooth(loss, smoothing_beta(len(loss))), lw=1.8, label="smoothed")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.legend()
        _save(fig, out / "loss.png", written)

    bins = [(name, *series(rows, name)) for name in sigma_bin_names()]
    bins = [b for b in bins if b[2]]
    if bins:
        import matplotlib as mpl

        fig, (ax_t, ax_b) = _figure(2)
        cmap = mpl.colormaps["viridis"]
        colors = [cmap(i / max(len(bins) - 1, 1)) for i in range(len(bins))]
        for i, (name, s, v) in enumerate(bins):
            label = "σ " + name.split("/", 1)[1]
            ax_t.plot(s, smooth(v, smoothing_beta(len(v))), color=colors[i], label=label)
        ax_t.set_ylabel("loss (smoothed)")
        ax_t.set_title("loss by noise level σ")
        ax_t.legend(fontsize=7, ncol=2)
        # Bars: each bin's mean over its last quarter of logged values (where training is now).
        means = [sum(v[-max(1, len(v) // 4) :]) / len(v[-max(1, len(v) // 4) :]) for _, _, v in bins]
        ax_b.bar([name.split("/", 1)[1] for name, _, _ in bins], means, color=colors)
        ax_b.set_xlabel("σ bin")
        ax_b.set_ylabel("mean loss, last 25% of steps")
        _save(fig, out / "loss_by_sigma.png", written)

    s_lr, lr = series(rows, "lr")
    if lr:
        fig, (ax,) = _figure()
        ax.plot(s_lr, lr)
        ax.set_ylabel("learning rate")
        ax.set_title("learning rate")
        _save(fig, out / "lr.png", written)

    s_t, t = series(rows, "s_per_step")
    s_x, x = series(rows, "samples_per_s")
    s_w, w = series(rows, "data_wait_frac")
    if t or x:
        fig, axes = _figure(3 if w else 2, height=3.0)
        axes[0].plot(s_t, t)
        axes[0].set_ylabel("s / step")
        axes[0].set_title("step time and throughput")
        axes[1].plot(s_x, x, color="tab:green")
        axes[1].set_ylabel("samples / s")
        if w:
            axes[2].plot(s_w, [100 * v for v in w], color="tab:red")
            axes[2].set_ylabel("data wait, % of step")
        _save(fig, out / "throughput.png", written)

    mem = [(k, *series(rows, k)) for k in ("mem/peak_rss_gb", "mem/cuda_max_alloc_gb")]
    mem = [m for m in mem if m[2]]
    if mem:
        fig, (ax,) = _figure()
        for key, s, v in mem:
            ax.plot(s, v, label=key.split("/", 1)[1])
        ax.set_ylabel("GiB")
        ax.set_title("peak memory")
        ax.legend()
        _save(fig, out / "memory.png", written)

    summary = out / "summary.txt"
    summary.write_text(summarize(rows, run_dir))
    written.append(summary)
    return written


def summarize(rows: list[dict[str, Any]], run_dir: Path | None = None) -> str:
    """Final/min loss, steps, wall time and throughput, as text."""
    lines = [f"run: {run_dir}"] if run_dir is not None else []
    first, last = rows[0]["step"], rows[-1]["step"]
    lines.append(f"steps: {last} (logged {len(rows)} rows, steps {first}..{last})")
    steps, loss = series(rows, "loss")
    if loss:
        sm = smooth(loss, smoothing_beta(len(loss)))
        i_min = min(range(len(loss)), key=loss.__getitem__)
        lines.append(f"final loss: {loss[-1]:.6g} (smoothed {sm[-1]:.6g})")
        lines.append(f"min loss: {loss[i_min]:.6g} at step {steps[i_min]} (min smoothed {min(sm):.6g})")
    # Step time: a row's s_per_step is the mean over the steps since the previous row.
    step_time, samples, timed_steps, prev = 0.0, 0.0, 0, 0
    for r in rows:
        n, prev = max(r["step"] - prev, 1), r["step"]
        if isinstance(r.get("s_per_step"), (int, float)):
            step_time += r["s_per_step"] * n
            timed_steps += n
            if isinstance(r.get("samples_per_s"), (int, float)):
                samples += r["samples_per_s"] * r["s_per_step"] * n
    # Wall time: `elapsed_s` counts from the start of each training session; it drops where a resume began.
    sessions, wall, last_elapsed = 0, 0.0, None
    for r in rows:
        e = r.get("elapsed_s")
        if not isinstance(e, (int, float)):
            continue
        if last_elapsed is None or e < last_elapsed:
            sessions += 1
            wall += last_elapsed or 0.0
        last_elapsed = e
    wall += last_elapsed or 0.0
    if sessions:
        lines.append(f"wall time: {_duration(wall)} ({sessions} training session{'s' if sessions > 1 else ''})")
    if step_time > 0:
        lines.append(f"step time: {_duration(step_time)} in total, {step_time / timed_steps:.4g} s/step on average")
        lines.append(f"throughput: {samples / step_time:.4g} samples/s")
    _, wait = series(rows, "data_wait_frac")
    if wait:
        lines.append(f"data wait: {100 * sum(wait) / len(wait):.1f}% of step time on average")
    for key, label in (("mem/peak_rss_gb", "peak RSS"), ("mem/cuda_max_alloc_gb", "peak CUDA allocated")):
        _, v = series(rows, key)
        if v:
            lines.append(f"{label}: {max(v):.3f} GiB")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
