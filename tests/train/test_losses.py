"""Loss functions: base errors, σ weighting, masks, prior preservation, distillation, and user losses by import
string. Every check compares with a value computed independently here."""

from __future__ import annotations

import math

import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.losses import LossContext, loss_from_config
from flowtrain.losses.flow_matching import FlowMatchingLoss
from flowtrain.losses.prior import PriorPreservationLoss


def _ctx(b: int = 4, n: int = 6, c: int = 3, seed: int = 0, **kw) -> LossContext:
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(b, n, c, generator=g), torch.randn(b, n, c, generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    pred = noise - x0 + torch.randn(b, n, c, generator=g) * 2.0  # errors on both sides of huber_delta
    x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    return LossContext(pred=pred, x0=x0, noise=noise, sigma=sigma, x_t=x_t, **kw)


def _cfg(**loss) -> FlowtrainConfig:
    return FlowtrainConfig.model_validate(
        {"model": {"family": "flux2_klein", "pretrained": "x", "dtype": "float32"}, "loss": loss}
    )


@pytest.mark.parametrize("base", ["mse", "l1", "huber", "logcosh"])
def test_base_losses(base):
    ctx = _ctx()
    d = ctx.pred - (ctx.noise - ctx.x0)
    expected_el = {
        "mse": d**2,
        "l1": d.abs(),
        "huber": torch.where(d.abs() < 0.5, 0.5 * d**2, 0.5 * (d.abs() - 0.25)),
        "logcosh": torch.log(torch.cosh(d)),
    }[base]
    loss, logs = FlowMatchingLoss(base=base, huber_delta=0.5)(ctx)
    per_sample = expected_el.flatten(1).mean(1)
    assert torch.allclose(logs["loss/per_sample"], per_sample, atol=1e-6)
    assert torch.allclose(loss, per_sample.mean(), atol=1e-6)
    assert logs["loss/per_sample"].shape == (4,) and not logs["loss/per_sample"].requires_grad


def test_logcosh_is_stable_for_large_errors():
    ctx = _ctx()
    ctx.pred = ctx.pred + 1e4
    loss, _ = FlowMatchingLoss(base="logcosh")(ctx)
    d = (ctx.pred - (ctx.noise - ctx.x0)).double()
    assert torch.isfinite(loss) and loss.item() == pytest.approx((d.abs() - math.log(2)).mean().item(), rel=1e-6)


@pytest.mark.parametrize(
    "weighting, w",
    [("sigma_sqrt", lambda s: s**-2), ("cosmap", lambda s: 2 / (math.pi * (1 - 2 * s + 2 * s**2)))],
)
def test_sigma_weighting(weighting, w):
    ctx = _ctx()
    plain = FlowMatchingLoss()(ctx)[1]["loss/per_sample"]
    weighted, logs = FlowMatchingLoss(weighting=weighting)(ctx)
    assert torch.allclose(logs["loss/per_sample"], plain * w(ctx.sigma), rtol=1e-5)
    assert torch.allclose(weighted, (plain * w(ctx.sigma)).mean(), rtol=1e-5)


def test_masks():
    ctx = _ctx()
    plain = FlowMatchingLoss()(ctx)[1]["loss/per_sample"]
    ctx.mask = torch.tensor([1.0, 0.0, 0.5, 1.0])  # per-sample weights
    assert torch.allclose(FlowMatchingLoss()(ctx)[1]["loss/per_sample"], plain * ctx.mask)
    token_mask = torch.zeros(4, 6)
    token_mask[:, :2] = 1.0  # only the first two tokens count: a mean over them
    ctx.mask = token_mask
    err = ((ctx.pred - (ctx.noise - ctx.x0)) ** 2)[:, :2].flatten(1).mean(1)
    assert torch.allclose(FlowMatchingLoss()(ctx)[1]["loss/per_sample"], err, atol=1e-6)


def test_step_passes_the_cache_mask_to_the_loss():
    """batch['loss_mask'] (the optional cache column) reaches LossContext.mask: per-sample (B, 1) and (B, h, w)."""
    from flowtrain.train.step import batch_mask

    assert torch.equal(batch_mask({"loss_mask": torch.tensor([[1.0], [0.0]])}, 64), torch.tensor([1.0, 0.0]))
    grid = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    assert torch.equal(batch_mask({"loss_mask": grid}, 16), grid.flatten(1))
    assert batch_mask({}, 16) is None
    with pytest.raises(ValueError, match="loss_mask"):
        batch_mask({"loss_mask": torch.ones(2, 5)}, 16)


def test_prior_preservation_adds_the_weighted_class_loss():
    is_prior = torch.tensor([False, False, True, True])
    ctx = _ctx(extra={"is_prior": is_prior})
    per = FlowMatchingLoss()(ctx)[1]["loss/per_sample"]
    loss, logs = PriorPreservationLoss(prior_loss_weight=0.25)(ctx)
    inst, prior = per[:2].mean(), per[2:].mean()
    assert torch.allclose(logs["loss/instance"], inst) and torch.allclose(logs["loss/prior"], prior)
    assert torch.allclose(loss, inst + 0.25 * prior)
    assert torch.equal(logs["loss/per_sample"], per)
    cfg = FlowtrainConfig.model_validate(
        {
            "model": {"family": "flux2_klein", "pretrained": "x", "dtype": "float32"},
            "dataset": {"class_cache_dir": "class-cache"},
            "loss": {"name": "prior_preservation", "prior_loss_weight": 0.25},
        }
    )
    built = loss_from_config(cfg)
    assert isinstance(built, PriorPreservationLoss) and built.prior_loss_weight == 0.25
    with pytest.raises(ValueError, match="class_cache_dir"):
        PriorPreservationLoss()(_ctx())


def test_distillation_runs_the_frozen_teacher_at_the_same_inputs(tiny_pipeline_dir):
    from diffusers import Flux2Transformer2DModel

    from flowtrain.losses.distill import DistillationLoss
    from flowtrain.models import get_family
    from flowtrain.train.trainable import load_teacher

    family = get_family("flux2_klein")
    cfg = FlowtrainConfig.model_validate(
        {
            "model": {"pretrained": str(tiny_pipeline_dir), "dtype": "float32"},
            "loss": {"name": "distillation", "teacher": str(tiny_pipeline_dir), "flow_weight": 0.5,
                     "distill_weight": 2.0, "base": "l1"},
        }
    )  # fmt: skip
    loss_fn = loss_from_config(cfg, family=family, teacher=load_teacher(cfg, family, "cpu"))
    assert isinstance(loss_fn, DistillationLoss)
    assert not loss_fn.teacher.training and not any(p.requires_grad for p in loss_fn.teacher.parameters())

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 64, 16, generator=g), torch.randn(2, 64, 16, generator=g)
    sigma, text = torch.tensor([0.3, 0.8]), torch.randn(2, 32, 96, generator=g)
    x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    reference = Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    with torch.no_grad():
        teacher_pred = family.predict(reference, x_t, sigma, {"text_embeds": text}, (8, 8))
    pred = (teacher_pred + 0.1 * torch.randn(teacher_pred.shape, generator=g)).requires_grad_(True)
    ctx = LossContext(
        pred=pred, x0=x0, noise=noise, sigma=sigma, x_t=x_t, extra={"cond": {"text_embeds": text}, "shape": (8, 8)}
    )
    loss, logs = loss_fn(ctx)
    flow = (pred - (noise - x0)).abs().flatten(1).mean(1)
    distill = (pred - teacher_pred).abs().flatten(1).mean(1)
    assert torch.allclose(logs["loss/distill"], distill.mean(), atol=1e-6)
    assert torch.allclose(logs["loss/flow"], flow.mean(), atol=1e-6)
    assert torch.allclose(loss, (0.5 * flow + 2.0 * distill).mean(), atol=1e-6)
    loss.backward()  # gradients reach the student's prediction only
    assert pred.grad is not None and all(p.grad is None for p in loss_fn.teacher.parameters())


def test_distillation_teacher_errors_name_the_key(tmp_path):
    from flowtrain.models import get_family
    from flowtrain.train.trainable import load_teacher

    cfg = _cfg(name="distillation", teacher=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="loss.teacher"):
        load_teacher(cfg, get_family("flux2_klein"), "cpu")
    with pytest.raises(ValueError, match="loaded teacher"):
        loss_from_config(cfg, family=get_family("flux2_klein"))


def test_loss_config_combinations_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="class_cache_dir"):
        _cfg(name="prior_preservation")
    with pytest.raises(ValidationError, match="loss.teacher"):
        _cfg(name="distillation")
    with pytest.raises(ValidationError, match="loss.name: distillation"):
        _cfg(teacher="some/path")
    with pytest.raises(ValidationError, match="prior_preservation"):
        FlowtrainConfig.model_validate(
            {
                "model": {"family": "flux2_klein", "pretrained": "x", "dtype": "float32"},
                "dataset": {"class_cache_dir": "c"},
            }
        )


USER_LOSSES = """
import torch

class ScaledMSE:
    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, ctx):
        per_sample = ((ctx.pred - (ctx.noise - ctx.x0)) ** 2).flatten(1).mean(1) * self.scale
        return per_sample.mean(), {"loss/per_sample": per_sample.detach()}

def plain_l1(ctx):
    return (ctx.pred - (ctx.noise - ctx.x0)).abs().mean(), {}
"""


def test_user_losses_by_import_string(tmp_path, monkeypatch):
    (tmp_path / "my_user_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = _ctx()
    mse = FlowMatchingLoss()(ctx)[0]
    scaled = loss_from_config(_cfg(name="my_user_losses:ScaledMSE", kwargs={"scale": 3.0}))
    assert torch.allclose(scaled(ctx)[0], 3 * mse)
    l1 = loss_from_config(_cfg(name="my_user_losses:plain_l1"))
    assert torch.allclose(l1(ctx)[0], FlowMatchingLoss(base="l1")(ctx)[0])
    with pytest.raises(ValueError, match="loss.kwargs"):
        loss_from_config(_cfg(name="my_user_losses:ScaledMSE", kwargs={"nope": 1}))
    with pytest.raises(ValueError, match="loss.kwargs"):
        loss_from_config(_cfg(name="flow_matching", kwargs={"nope": 1}))
    from flowtrain.registry import ImportStringError, UnknownNameError

    with pytest.raises(UnknownNameError, match="flow_matching"):
        loss_from_config(_cfg(name="flow_matchin"))
    with pytest.raises(ImportStringError):
        loss_from_config(_cfg(name="no_such_module_xyz:Loss"))


@pytest.mark.parametrize("kind", ["per_sample", "token_grid"])
def test_cache_loss_mask_column_reaches_the_loss_context(tiny_cache, tmp_path, kind):
    """An optional `loss_mask` column in the cache shards flows through CacheDataset → collate → make_inputs."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowtrain.data.cache import CacheDataset
    from flowtrain.data.tensors import tensor_column
    from flowtrain.models import get_family
    from flowtrain.train.step import make_inputs

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache[1], cache)
    for shard in json.loads((cache / "manifest.json").read_text())["shards"]:
        table = pq.read_table(cache / shard["file"])
        n = table.num_rows
        if kind == "per_sample":
            column = pa.array([float(i % 2) for i in range(n)], pa.float32())
        else:
            grid = torch.zeros(n, 8, 8)
            grid[:, :4] = 1.0  # the top half of the 8×8 token grid
            column = tensor_column(grid, "float32")
        pq.write_table(table.append_column("loss_mask", column), cache / shard["file"], row_group_size=16)
    ds = CacheDataset(cache)
    batch = ds.collate([ds[0], ds[1]])
    cfg = FlowtrainConfig.model_validate({"model": {"family": "flux2_klein", "pretrained": "x", "dtype": "float32"}})
    stats = ds.latent_norm
    inputs = make_inputs(batch, cfg, get_family("flux2_klein"), stats, None, torch.Generator().manual_seed(0), "cpu")
    if kind == "per_sample":
        assert inputs.mask.tolist() == [0.0, 1.0]
    else:
        assert inputs.mask.shape == (2, 64) and inputs.mask[:, :32].eq(1).all() and inputs.mask[:, 32:].eq(0).all()
