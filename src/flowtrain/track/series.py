"""Pure helpers over logged series, without torch: the σ-bin metric names and the loss smoother.

Kept apart from `track.stats` (which accumulates tensors) so that drawing the graphs — in the MLflow child process
or `flowtrain plot` — does not import torch: that import alone took ~2 s of the child's end-of-run work.
"""

from __future__ import annotations

SIGMA_BINS = 10


def sigma_bin_names(n: int = SIGMA_BINS) -> list[str]:
    """Metric names of the bins: `loss_by_sigma/0.0-0.1`, ... (σ ∈ [0, 1] split evenly)."""
    return [f"loss_by_sigma/{i / n:.1f}-{(i + 1) / n:.1f}" for i in range(n)]


class Smoother:
    """Bias-corrected exponential moving average (as in Adam / TensorBoard smoothing) of a logged series."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.avg, self.n = beta, 0.0, 0

    def update(self, x: float) -> float:
        if x != x:  # NaN: keep the average meaningful; the raw value is still logged
            return self.value
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * x
        return self.value

    @property
    def value(self) -> float:
        return self.avg / (1 - self.beta**self.n) if self.n else float("nan")


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """The Smoother applied along a whole series."""
    s = Smoother(beta)
    return [s.update(v) for v in values]
