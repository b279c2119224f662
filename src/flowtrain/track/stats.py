"""Cheap training statistics for the metrics row: loss by σ-bin, data-wait time, memory, a smoothed loss.

Tensors stay on the training device between logged steps (the loss accumulates there, each sample's σ and loss are
kept) and are read back together in the one host sync of a logged step (see `train.loop`); the σ-bins are filled on
the host from that read-back.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flowtrain.track.series import SIGMA_BINS, Smoother, sigma_bin_names, smooth  # noqa: F401  re-exported


class SigmaBinLoss:
    """Mean per-sample loss per σ-bin between logged steps, binned on the host.

    `add` (per micro-batch) only keeps the (B,) σ and loss tensors, launching nothing; `end_step(ok)` folds the
    step's into the interval unless the step was skipped (a non-finite loss would poison every bin); `pending()`
    is the interval's σs and losses, which the meter reads back with the loss in the one host sync of a logged
    step; `sums` bins those host values into [sums ‖ counts] (reduced across processes with the loss) and `values`
    makes the metrics.

    Why on the host: binning on the device took ~10 tiny kernels per micro-batch (~0.1 ms of a ~10 ms CPU step);
    the values are a few floats per sample, and the loss's read-back carries them for free.
    """

    _FOLD_AT = 256  # pending micro-batches kept as separate tensors before they are concatenated into one

    def __init__(self, n: int = SIGMA_BINS):
        self.n = n
        self.names = sigma_bin_names(n)
        self._step: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._window: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, sigma: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """sigma, per_sample_loss: (B,) on the training device."""
        self._step.append((sigma.detach(), per_sample_loss.detach()))

    def end_step(self, ok: bool = True) -> None:
        if ok:
            self._window += self._step
            if len(self._window) >= self._FOLD_AT:  # a long log interval: keep the list short
                self._window = [self.pending()]
        self._step = []

    def pending(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(σ (K,), loss (K,)) float32 of every sample since the last reset, None if there was none."""
        if not self._window:
            return None
        if len(self._window) == 1:
            sigma, loss = self._window[0]
            return sigma.float(), loss.float()
        return torch.cat([t[0] for t in self._window]).float(), torch.cat([t[1] for t in self._window]).float()

    def sums(self, sigmas: list[float], losses: list[float]) -> list[float]:
        """Host values of `pending()` → [sum of losses per bin (n) ‖ samples per bin (n)]; σ = 1 is in the last bin."""
        n, out = self.n, [0.0] * (2 * self.n)
        for s, v in zip(sigmas, losses, strict=True):
            i = min(max(int(s * n), 0), n - 1)
            out[i] += v
            out[n + i] += 1.0
        return out

    def reset(self) -> None:
        self._window = []

    def values(self, sums: list[float]) -> dict[str, float]:
        """Mean loss per bin from `sums` (possibly reduced across processes); bins that saw no sample are left out."""
        totals, counts = sums[: self.n], sums[self.n :]
        return {name: s / c for name, s, c in zip(self.names, totals, counts, strict=True) if c > 0}


class LossParts:
    """Means of the loss's 0-dim parts (`loss/instance`, `loss/prior`, `loss/flow`, `loss/distill`, ...) between
    logged steps, on device like the σ-bins; a skipped step's parts are dropped with it."""

    def __init__(self) -> None:
        self.step_acc: dict[str, torch.Tensor] = {}
        self.acc: dict[str, torch.Tensor] = {}
        self.step_micro, self.micro = 0, 0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            if k.startswith("loss/") and isinstance(v, torch.Tensor) and v.ndim == 0:
                self.step_acc[k] = self.step_acc.get(k, 0.0) + v.detach().float()
        self.step_micro += 1

    def end_step(self, ok: bool = True) -> None:
        if ok:
            for k, v in self.step_acc.items():
                self.acc[k] = self.acc.get(k, 0.0) + v
            self.micro += self.step_micro
        self.step_acc, self.step_micro = {}, 0

    def state(self, device: torch.device) -> tuple[list[str], torch.Tensor | None]:
        """Sorted names and their (k,) means (None without parts); the same names on every process (the loss is
        the same)."""
        names = sorted(self.acc)
        if not names:
            return [], None
        return names, torch.stack([self.acc[k] for k in names]).to(device) / max(self.micro, 1)

    def reset(self) -> None:
        self.acc, self.micro = {}, 0


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, and the CUDA allocator's peak on a GPU, in GiB. No device sync."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"mem/peak_rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}
    if device.type == "cuda":
        out["mem/cuda_max_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


class TrainMeter:
    """What the loop measures between two logged steps besides the loss, and the metrics row.

    The loop keeps its loss accumulators (a checkpoint carries them); this keeps time, data-wait time, the loss by
    σ-bin and the smoothed loss for the progress bar. `row` reduces the mean loss and the σ-bins across processes
    and reads them back, with the grad norm, in the one host sync of a logged step. Time spent inside `paused()`
    (validation sampling) is not step time.
    """

    def __init__(self, device: torch.device, *, samples_per_step: int):
        self.device, self.samples_per_step = device, samples_per_step
        self.sigma_bins = SigmaBinLoss()
        self.parts = LossParts()
        self.smoothed = Smoother()
        self.t_start = time.perf_counter()
        self._reset(self.t_start)

    def _reset(self, now: float) -> None:
        self.steps, self.wait, self.t_last = 0, 0.0, now
        self.sigma_bins.reset()
        self.parts.reset()

    def next_batch(self, batches: Iterator) -> Any:
        """`next(batches)`, timing how long the loop waits for data."""
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        return batch

    def add(self, sigma: torch.Tensor, logs: dict[str, torch.Tensor] | None) -> None:
        """One micro-batch: its (B,) σ and the loss's logs (`loss/per_sample`, (B,), when the loss provides it)."""
        per_sample = logs.get("loss/per_sample") if logs else None
        if per_sample is not None and per_sample.shape == sigma.shape:
            self.sigma_bins.add(sigma, per_sample)
        if logs:
            self.parts.add(logs)

    def end_step(self, ok: bool = True) -> None:
        """After each optimizer step; `ok=False` for a skipped (non-finite) step."""
        self.sigma_bins.end_step(ok)
        self.parts.end_step(ok)
        self.steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t_last += time.perf_counter() - t

    def row(
        self,
        mean_loss: torch.Tensor,
        grad_norm: torch.Tensor | float | None,
        *,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None,
        lr: float,
        epoch: int,
    ) -> dict[str, float | None]:
        """The metrics since the last row. `mean_loss`: this process's 0-dim mean loss on device; `reduce`
        averages a tensor over processes (a collective: every process calls `row` at the same steps), None with
        one process."""
        part_names, parts = self.parts.state(self.device)
        tensor_norm = isinstance(grad_norm, torch.Tensor)
        pending = self.sigma_bins.pending()
        pieces = [mean_loss.detach().float().view(1)]
        pieces += [] if parts is None else [parts]
        pieces += [grad_norm.detach().float().view(1).to(self.device)] if tensor_norm else []
        pieces += [] if pending is None else [t.to(self.device) for t in pending]
        host = torch.cat(pieces).tolist()  # the one host sync of a logged step
        k, m = (0 if pending is None else len(pending[0])), len(part_names)
        bins = self.sigma_bins.sums(host[len(host) - 2 * k : len(host) - k], host[len(host) - k :])
        # loss ‖ σ-bin sums and counts ‖ loss parts: as is with one process, else their means over processes
        shared = [host[0], *bins, *host[1 : 1 + m]]
        if reduce is not None:
            shared = reduce(torch.tensor(shared, device=self.device)).tolist()
        now = time.perf_counter()
        dt = now - self.t_last
        s_per_step = dt / max(self.steps, 1)
        n = self.sigma_bins.n
        row: dict[str, float | None] = {
            "loss": shared[0],
            "lr": lr,
            "grad_norm": host[1 + m] if tensor_norm else (None if grad_norm is None else float(grad_norm)),
            "s_per_step": s_per_step,
            "samples_per_s": self.samples_per_step / s_per_step if s_per_step > 0 else None,
            "epoch": epoch,
            "data_wait_frac": min(self.wait / dt, 1.0) if dt > 0 else 0.0,
            "elapsed_s": now - self.t_start,
            **memory_metrics(self.device),
            **self.sigma_bins.values(shared[1 : 1 + 2 * n]),
            **dict(zip(part_names, shared[1 + 2 * n :], strict=True)),
        }
        self.smoothed.update(shared[0])
        self._reset(now)
        return row

    def postfix(self, row: dict[str, float | None]) -> str:
        """Progress-bar text: smoothed and last loss, lr, step time, throughput."""
        sps = row["samples_per_s"]
        return (
            f"loss={self.smoothed.value:.4f} (last {row['loss']:.4f}), lr={row['lr']:.2e}, "
            f"{row['s_per_step']:.3g}s/step, {sps if sps is not None else float('nan'):.3g} samples/s"
        )
