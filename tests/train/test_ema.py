"""EMA of the trainable weights: the update rule (decay, interval, start), swapping in and out, and in training:
checkpointed, resumed exactly, and used for the exported LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flowtrain.train.ema import EMA


def _model() -> torch.nn.Module:
    m = torch.nn.Linear(3, 2)
    m.bias.requires_grad_(False)  # frozen parameters are not averaged
    return m


def _set(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


@pytest.mark.parametrize("device", [None, "cpu"])
def test_update_rule(device):
    m = _model()
    _set(m, 0.0)
    ema = EMA(m, decay=0.9, update_every=2, start_step=1, device=device)
    assert list(ema.shadow) == ["weight"]
    expected = 0.0
    for step, w in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], start=1):
        _set(m, w)
        ema.update(step)
        if step <= 1:
            expected = w  # up to start_step: a copy
        elif (step - 1) % 2 == 0:
            expected = 0.9 * expected + 0.1 * w
        assert ema.shadow["weight"][0, 0].item() == pytest.approx(expected, rel=1e-6), step
    # steps 3 and 5 updated: 0.9·(0.9·1 + 0.1·3) + 0.1·5
    assert expected == pytest.approx(0.9 * (0.9 * 1 + 0.1 * 3) + 0.1 * 5)


def test_swapped_in_restores_the_trained_weights_even_after_an_error():
    m = _model()
    _set(m, 1.0)
    ema = EMA(m, decay=0.5)
    _set(m, 3.0)
    ema.update(1)  # ema = 2
    trained = m.weight.detach().clone()
    with ema.swap_factory(m)():
        assert torch.all(m.weight == 2.0)
        assert torch.all(m(torch.ones(1, 3)) == 6.0 + m.bias)
    assert torch.equal(m.weight, trained)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in(m):
        raise RuntimeError("boom")
    assert torch.equal(m.weight, trained)
    with pytest.raises(ValueError, match="not the model"), ema.swapped_in(_model()):
        pass


def test_state_dict_round_trip_and_mismatch():
    m = _model()
    ema = EMA(m, decay=0.5)
    other = EMA(_model(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({"bias": torch.zeros(2)})


def _peft_to_param_name(key: str) -> str:
    """`transformer.x.lora_A.weight` (diffusers LoRA file) → `x.lora_A.default.weight` (parameter name)."""
    key = key.removeprefix("transformer.")
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.weight", f".{part}.default.weight")
    return key


def test_ema_in_training(tiny_pipeline_dir, tiny_cache, tmp_path, monkeypatch):
    """3 steps with a checkpoint each: the EMA follows the rule from the checkpointed weights, a run resumed at
    step 2 ends with a bitwise-equal EMA, and the exported LoRA file holds the EMA weights, not the raw ones."""
    from flowtrain.testing.training import train_config
    from flowtrain.train.loop import train

    ema = {"enabled": True, "decay": 0.5, "start_step": 1}
    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "a", train={"max_steps": 3, "learning_rate": 1e-2},
        checkpoint={"every_steps": 1, "keep_last": None}, ema=ema,
    )  # fmt: skip
    train(cfg, progress=False)
    a = tmp_path / "a"
    w = {s: load_file(str(a / f"checkpoint-{s}" / "trainable.safetensors")) for s in (1, 2, 3)}
    e = {s: load_file(str(a / f"checkpoint-{s}" / "ema.safetensors")) for s in (1, 2, 3)}
    lora_b = next(k for k in w[1] if "lora_B" in k)
    assert not torch.equal(w[1][lora_b], w[3][lora_b])
    for k in w[1]:
        assert torch.equal(e[1][k], w[1][k])  # start_step 1: a copy
        assert torch.allclose(e[2][k], 0.5 * (w[1][k] + w[2][k]), atol=1e-7)
        assert torch.allclose(e[3][k], 0.5 * e[2][k] + 0.5 * w[3][k], atol=1e-7)

    exported = {_peft_to_param_name(k): v for k, v in load_file(str(a / "pytorch_lora_weights.safetensors")).items()}
    assert exported.keys() == e[3].keys()
    assert all(torch.equal(exported[k], e[3][k]) for k in exported)
    assert not torch.equal(exported[lora_b], w[3][lora_b])

    resumed = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path / "b", train={"max_steps": 3, "learning_rate": 1e-2},
        checkpoint={"every_steps": 1, "keep_last": None}, ema=ema,
    )  # fmt: skip
    train(resumed, resume=str(a / "checkpoint-2"), progress=False)
    e_b = load_file(str(tmp_path / "b" / "checkpoint-3" / "ema.safetensors"))
    assert all(torch.equal(e_b[k], e[3][k]) for k in e_b)
