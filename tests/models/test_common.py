"""The helpers families share (`models/common.py`): each equal to the diffusers code it stands for."""

from __future__ import annotations

import math

import pytest

from flowtrain.models import common

# The scheduler configs of FLUX.1-dev and Qwen/Qwen-Image (the parts the shift reads).
FLUX1_DEV = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
             "max_shift": 1.15, "time_shift_type": "exponential", "shift": 3.0}  # fmt: skip
QWEN_IMAGE = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5,
              "max_shift": 0.9, "time_shift_type": "exponential", "shift": 1.0}  # fmt: skip


@pytest.mark.parametrize("module", ["flux.pipeline_flux", "qwenimage.pipeline_qwenimage"])
def test_calculate_shift_is_diffusers_to_the_last_bit(module):
    import importlib

    reference = importlib.import_module(f"diffusers.pipelines.{module}").calculate_shift
    for config in (FLUX1_DEV, QWEN_IMAGE):
        args = [config[k] for k in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")]
        for n in range(1, 10_000, 7):
            assert common.calculate_shift(n, *args) == reference(n, *args), (n, args)
    assert common.calculate_shift(4096) == reference(4096)  # the defaults are diffusers' too


def test_scheduler_shift_follows_the_scheduler_config():
    """Dynamic exponential: s = e^μ; linear: s = μ; no dynamic shifting: the static `shift`."""
    mu = common.calculate_shift(4096, 256, 4096, 0.5, 1.15)
    assert common.scheduler_shift(4096, FLUX1_DEV) == math.exp(mu) == pytest.approx(3.1582, abs=1e-4)
    assert common.scheduler_shift(4096, {**FLUX1_DEV, "time_shift_type": "linear"}) == mu
    assert common.scheduler_shift(4096, {**FLUX1_DEV, "use_dynamic_shifting": False}) == 3.0
    assert common.scheduler_shift(6889, QWEN_IMAGE) == pytest.approx(2.3033, abs=1e-4)
