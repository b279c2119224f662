"""Optimizers from config: each name builds the library's optimizer with the configured hyper-parameters (checked
against the library used directly), steps, and round-trips its state through `torch.load(weights_only=True)`."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

from flowtrain.config import FlowtrainConfig, load_config
from flowtrain.config.schema import OptimizerConfig
from flowtrain.train.optim import build_lr_scheduler, build_optimizer

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(80, 64, generator=g)), torch.nn.Parameter(torch.randn(64, generator=g))]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


def _reference(name: str, params, lr: float):
    """The library optimizer built by hand with the hyper-parameters the config below sets."""
    adam = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **adam)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **adam)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.7, weight_decay=0.05)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.7, eps=1e-6, weight_decay=0.05)
    if name == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=lr, **adam, d_coef=0.5)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, **adam)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=0.05, relative_step=False, scale_parameter=False,
                         warmup_init=False)  # fmt: skip
    raise AssertionError(name)


NAMES = ["adamw", "adam", "sgd", "rmsprop", "prodigy", "adamw8bit", "adafactor"]


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_matches_the_library_and_round_trips(name):
    cfg = OptimizerConfig(
        name=name, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, momentum=0.7,
        kwargs={"d_coef": 0.5} if name == "prodigy" else {},
    )  # fmt: skip
    lr = 1.0 if name == "prodigy" else 1e-2
    ours_params, ref_params = _params(), _params()
    ours = build_optimizer(ours_params, cfg, lr)
    ref = _reference(name, ref_params, lr)
    assert type(ours) is type(ref)
    a, b = _run(ours, ours_params), _run(ref, ref_params)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True)), name
    assert not all(torch.equal(x, y) for x, y in zip(a, _params(), strict=True))  # it did move the weights
    # state through a checkpoint (weights_only=True, as checkpoint.load_checkpoint does), then on in lockstep
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    fresh_params = [torch.nn.Parameter(x.clone()) for x in a]
    fresh = build_optimizer(fresh_params, cfg, lr)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    c, d = _run(fresh, fresh_params, 2), _run(ours, ours_params, 2)
    assert all(torch.equal(x, y) for x, y in zip(c, d, strict=True)), name


def test_adamw8bit_keeps_8bit_states():
    params = _params()
    opt = build_optimizer(params, OptimizerConfig(name="adamw8bit"), 1e-3)
    _run(opt, params, 1)
    big = opt.state[params[0]]  # 80×64 = 5120 ≥ 4096 elements: 8-bit blockwise states
    assert big["state1"].dtype == torch.uint8 and big["state2"].dtype == torch.uint8


def test_implementation_selects_the_torch_kernels():
    fused = build_optimizer(_params(), OptimizerConfig(name="adamw", implementation="fused"), 1e-3)
    assert fused.defaults["fused"] is True
    default = build_optimizer(_params(), OptimizerConfig(name="sgd"), 1e-3)  # auto: fused kernels exist on CPU
    assert default.defaults["fused"] is True and not default.defaults.get("foreach")
    foreach = build_optimizer(_params(), OptimizerConfig(name="sgd", implementation="foreach"), 1e-3)
    assert foreach.defaults["foreach"] is True and not foreach.defaults.get("fused")
    loop = build_optimizer(_params(), OptimizerConfig(name="rmsprop", implementation="for_loop"), 1e-3)
    assert loop.defaults["foreach"] is False
    with pytest.raises(ValueError, match="implementation"):
        OptimizerConfig(name="prodigy", implementation="fused")
    with pytest.raises(ValueError, match="rmsprop has no fused"):
        OptimizerConfig(name="rmsprop", implementation="fused")


def test_lr_scale_makes_parameter_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cfg = OptimizerConfig(name="adamw", lr_scale={r"^1\.": 4.0, r"bias": 0.5})
    opt = build_optimizer(model.named_parameters(), cfg, 1e-3)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model[0].weight)] == pytest.approx(1e-3)
    assert lrs[id(model[0].bias)] == pytest.approx(5e-4)
    assert lrs[id(model[1].weight)] == pytest.approx(4e-3)
    assert lrs[id(model[1].bias)] == pytest.approx(4e-3)  # first matching regex wins
    sched = build_lr_scheduler(
        opt, FlowtrainConfig.model_validate({"model": {"family": "flux2_klein", "pretrained": "x"}}).lr_scheduler, 10
    )
    assert sorted(sched.get_last_lr()) == pytest.approx([5e-4, 1e-3, 4e-3])
    with pytest.raises(ValueError, match="match no trainable parameter"):
        build_optimizer(model.named_parameters(), OptimizerConfig(lr_scale={"lora_B": 2.0}), 1e-3)
    with pytest.raises(ValueError, match="named parameters"):
        build_optimizer(model.parameters(), cfg, 1e-3)
    with pytest.raises(ValueError, match="valid regex"):
        OptimizerConfig(lr_scale={"(": 2.0})


def test_no_trainable_parameters_is_an_error():
    p = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([p], OptimizerConfig(), 1e-3)


def test_bad_kwargs_name_the_optimizer():
    with pytest.raises(ValueError, match="optimizer.kwargs"):
        build_optimizer(_params(), OptimizerConfig(name="adamw", kwargs={"nope": 1}), 1e-3)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (optional extra flowtrain[lowbit])")
@pytest.mark.parametrize(("name", "cls"), [("ao_adamw8bit", "AdamW8bit"), ("ao_adamw4bit", "AdamW4bit")])
def test_torchao_optimizers(name, cls):
    """The config builds torchao's class with the configured hyper-parameters (the same updates as that class built
    by hand), its moments are stored low-bit, and its updates point where fp32 AdamW's do without equalling them."""
    import torchao.optim

    adam = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    params, by_hand, fp32, start = _params(), _params(), _params(), _params()
    opt = build_optimizer(params, OptimizerConfig(name=name, **adam), 1e-2)
    assert type(opt) is getattr(torchao.optim, cls)
    got = _run(opt, params, 2)
    want = _run(getattr(torchao.optim, cls)(by_hand, lr=1e-2, **adam), by_hand, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    exact = _run(torch.optim.AdamW(fp32, lr=1e-2, **adam), fp32, 2)
    update, exact_update = (torch.cat([(a - b).flatten() for a, b in zip(x, start, strict=True)]) for x in (got, exact))
    assert torch.nn.functional.cosine_similarity(update, exact_update, dim=0) > 0.98
    assert not torch.equal(update, exact_update)
    moment = opt.state[params[0]]["exp_avg"]  # torchao quantises tensors of >= 4096 elements (80×64 here)
    assert type(moment) is not torch.Tensor and type(moment).__module__.startswith("torchao")


def test_missing_torchao_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # what `import` sees when the package is absent
    with pytest.raises(ImportError, match=r"flowtrain\[lowbit\]"):
        build_optimizer(_params(), OptimizerConfig(name="ao_adamw8bit"), 1e-3)


SHIPPED = sorted((Path(__file__).parents[2] / "configs" / "klein4b").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_optimizer_settings_build(path):
    """The shipped recipes' optimizer kwargs and schedules are accepted by the real optimizers."""
    cfg = load_config(path)
    params = _params()
    opt = build_optimizer(params, cfg.optimizer, cfg.train.learning_rate)
    sched = build_lr_scheduler(opt, cfg.lr_scheduler, cfg.train.max_steps)
    _run(opt, params, 1)
    sched.step()


def test_changed_lr_on_resume_keeps_the_lr_scale_ratios():
    from flowtrain.train.resume import apply_changed_schedule

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cfg = FlowtrainConfig.model_validate(
        {
            "model": {"family": "flux2_klein", "pretrained": "x"},
            "train": {"learning_rate": 2e-3, "max_steps": 10},
            "optimizer": {"lr_scale": {r"^1\.": 3.0}},
            "lr_scheduler": {"name": "linear", "warmup_steps": 0},
        }
    )
    opt = build_optimizer(model.named_parameters(), cfg.optimizer, 1e-3)  # the run was started with lr 1e-3
    sched = build_lr_scheduler(opt, cfg.lr_scheduler, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    from flowtrain.train.state import DataPosition, TrainState

    old = TrainState(step=4, data=DataPosition(0, 4, 0), essentials={}, learning_rate=1e-3, max_steps=10,
                     world_size=1, global_batch=1)  # fmt: skip
    apply_changed_schedule(old, cfg, opt, sched)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([2e-3 * 0.6, 6e-3 * 0.6])
