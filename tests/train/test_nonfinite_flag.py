"""The per-step non-finite check: one test of the loss plus the grad norm, no host sync."""

from __future__ import annotations

import pytest
import torch

from flowtrain.train.control import nonfinite_flag

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("loss", "grad_norm", "bad"),
    [
        (0.5, 2.0, False),
        (0.5, None, False),
        (NAN, 2.0, True),
        (INF, None, True),
        (0.5, INF, True),
        (0.5, NAN, True),
        (-INF, INF, True),  # the sum is NaN: still caught
        (3e38, 3e38, True),  # finite parts whose sum overflows float32: a step lost either way
    ],
)
def test_nonfinite_flag(loss, grad_norm, bad):
    norm = None if grad_norm is None else torch.tensor(grad_norm)
    flag = nonfinite_flag(torch.tensor(loss, requires_grad=True), norm)
    assert flag.ndim == 0 and not flag.requires_grad and bool(flag) is bad
    if grad_norm is not None:  # a float norm (some engines return one) is checked alike
        assert bool(nonfinite_flag(torch.tensor(loss), grad_norm)) is bad
