"""Cheap training statistics for the metrics row: loss by σ-bin, data-wait time, memory, a smoothed loss.

Everything that touches tensors accumulates on the training device and is read back together with the loss in the
one host sync of a logged step (see `train.loop`).
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
    """Sum and count of per-sample losses per σ-bin, kept on device between logged steps.

    `add` (per micro-batch) costs a couple of tiny kernels and no host sync; `end_step(ok)` folds the step into the
    interval unless the step was skipped (a non-finite loss would poison every bin); `state()` is the (2·n,) tensor
    [sums ‖ counts] that is reduced across processes and read back with the loss; `values(host)` makes the metrics.
    """

    def __init__(self, device: torch.device, n: int = SIGMA_BINS):
        self.n = n
        self.names = sigma_bin_names(n)
        self.step_acc = torch.zeros(2 * n, device=device, dtype=torch.float32)
        self.acc = torch.zeros(2 * n, device=device, dtype=torch.float32)

    def add(self, sigma: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """sigma, per_sample_loss: (B,) on the training device."""
        idx = (sigma.detach().float() * self.n).long().clamp_(0, self.n - 1)
        # A one-hot product rather than index_add_/scatter_add_: deterministic on every device, and B is small.
        onehot = torch.nn.functional.one_hot(idx, self.n).float()  # (B, n)
        self.step_acc += torch.cat([per_sample_loss.detach().float() @ onehot, onehot.sum(0)])

    def end_step(self, ok: bool = True) -> None:
        if ok:
            self.acc += self.step_acc
        self.step_acc.zero_()

    def state(self) -> torch.Tensor:
        return self.acc

    def reset(self) -> None:
        self.acc.zero_()

    def values(self, host: list[float]) -> dict[str, float]:
        """Mean loss per bin from a host copy of `state()`; bins that saw no sample are left out."""
        sums, counts = host[: self.n], host[self.n :]
        return {name: s / c for name, s, c in zip(self.names, sums, counts, strict=True) if c > 0}


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

    def state(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """Sorted names and their (k,) means; the same names on every process (the loss is the same)."""
        names = sorted(self.acc)
        if not names:
            return [], torch.zeros(0, device=device)
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
        self.sigma_bins = SigmaBinLoss(device)
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
        reduce: Callable[[torch.Tensor], torch.Tensor],
        lr: float,
        epoch: int,
    ) -> dict[str, float | None]:
        """The metrics since the last row. `mean_loss`: this process's 0-dim mean loss on device; `reduce`
        averages a tensor over processes (a collective: every process calls `row` at the same steps)."""
        part_names, parts = self.parts.state(self.device)
        vec = reduce(torch.cat([mean_loss.detach().float().view(1), self.sigma_bins.state(), parts]))
        tensor_norm = isinstance(grad_norm, torch.Tensor)
        if tensor_norm:
            vec = torch.cat([vec, grad_norm.detach().float().view(1).to(vec.device)])
        host = vec.tolist()  # the one host sync of a logged step
        now = time.perf_counter()
        dt = now - self.t_last
        s_per_step = dt / max(self.steps, 1)
        n = self.sigma_bins.n
        row: dict[str, float | None] = {
            "loss": host[0],
            "lr": lr,
            "grad_norm": host[-1] if tensor_norm else (None if grad_norm is None else float(grad_norm)),
            "s_per_step": s_per_step,
            "samples_per_s": self.samples_per_step / s_per_step if s_per_step > 0 else None,
            "epoch": epoch,
            "data_wait_frac": min(self.wait / dt, 1.0) if dt > 0 else 0.0,
            "elapsed_s": now - self.t_start,
            **memory_metrics(self.device),
            **self.sigma_bins.values(host[1 : 1 + 2 * n]),
            **dict(zip(part_names, host[1 + 2 * n : 1 + 2 * n + len(part_names)], strict=True)),
        }
        self.smoothed.update(host[0])
        self._reset(now)
        return row

    def postfix(self, row: dict[str, float | None]) -> str:
        """Progress-bar text: smoothed and last loss, lr, step time, throughput."""
        sps = row["samples_per_s"]
        return (
            f"loss={self.smoothed.value:.4f} (last {row['loss']:.4f}), lr={row['lr']:.2e}, "
            f"{row['s_per_step']:.3g}s/step, {sps if sps is not None else float('nan'):.3g} samples/s"
        )
