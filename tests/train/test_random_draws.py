"""`train.random_draws: global`: a process's share of a micro-batch gets exactly the σ, noise, caption dropout and
posterior samples that one process with the whole global batch draws for those rows."""

from __future__ import annotations

import pytest
import torch


def _inputs(cfg, dataset, batch, part, rank=0):
    from flowtrain.models import get_family
    from flowtrain.train.step import make_inputs, step_seed

    family = get_family(cfg.model.family)
    empty = family.conditioning(dataset.empty_batch(), cfg.model)
    gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, 3, 0, rank))
    return make_inputs(batch, cfg, family, dataset.latent_norm, empty, gen, torch.device("cpu"), part=part)


def _assert_same(a, b):
    for name in ("x0", "noise", "sigma"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.cond.keys() == b.cond.keys()
    for k in a.cond:
        assert torch.equal(a.cond[k], b.cond[k]), k


@pytest.mark.parametrize("with_class_rows", [False, True])
def test_each_process_keeps_its_rows_of_the_global_draw(tiny_pipeline_dir, tiny_cache, tmp_path, with_class_rows):
    from flowtrain.data.cache import CacheDataset
    from flowtrain.data.prior import merge_class_rows
    from flowtrain.testing.training import train_config
    from flowtrain.train.step import batch_part

    cfg = train_config(
        tiny_pipeline_dir, tiny_cache[1], tmp_path, dataset={"latent_sampling": "sample"},
        train={"caption_dropout": 0.5},
    )  # fmt: skip
    ds = CacheDataset(cfg.dataset.cache_dir)
    world, b = 2, 2

    def rows(first: int, n: int) -> dict[str, torch.Tensor]:
        return ds.collate([ds[i] for i in range(first, first + n)])

    def batch_of(rank: int, per_rank: int) -> dict[str, torch.Tensor]:
        inst = rows(rank * per_rank, per_rank)
        # DreamBooth: the class rows (here rows 4..7) follow the instance rows in every process's batch
        return merge_class_rows(inst, rows(4 + rank * per_rank, per_rank)) if with_class_rows else inst

    whole = _inputs(cfg, ds, batch_of(0, world * b), None)  # one process, global batch 4
    shares = [_inputs(cfg, ds, batch_of(r, b), batch_part(batch_of(r, b), r, world)) for r in range(world)]
    n = world * b
    for r, share in enumerate(shares):
        keep = torch.arange(r * b, (r + 1) * b)
        if with_class_rows:
            keep = torch.cat([keep, n + keep])
        want = type(whole)(
            x0=whole.x0[keep], noise=whole.noise[keep], sigma=whole.sigma[keep],
            cond={k: v[keep] for k, v in whole.cond.items()}, shape=whole.shape,
        )  # fmt: skip
        _assert_same(share, want)
    # The draws differ between rows (the check above could not pass by accident with equal rows).
    assert not torch.equal(shares[0].noise, shares[1].noise) and not torch.equal(shares[0].sigma, shares[1].sigma)


def test_one_process_and_per_process_draws_are_unchanged(tiny_pipeline_dir, tiny_cache, tmp_path):
    """One process has no part (its batch is the global one); `per_process` keys each process's stream by rank."""
    from flowtrain.data.cache import CacheDataset
    from flowtrain.testing.training import train_config
    from flowtrain.train.step import draws_for

    cfg = train_config(tiny_pipeline_dir, tiny_cache[1], tmp_path)
    batch = CacheDataset(cfg.dataset.cache_dir).collate([CacheDataset(cfg.dataset.cache_dir)[0]])
    assert draws_for("global", batch, 0, 1) == (0, None)
    assert draws_for("per_process", batch, 1, 2) == (1, None)
    rank, part = draws_for("global", batch, 1, 2)
    assert rank == 0 and part.total == 2 and part.rows.tolist() == [1]
