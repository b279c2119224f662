"""Aspect-ratio buckets: the bucket math (flowtrain.data.buckets) and the bucket sampler (data.bucket_sampler),
without encoders. The cache and a training run on a mixed-shape dataset are in test_buckets_cache.py."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from flowtrain.data.bucket_sampler import BucketSampler, bucket_batches
from flowtrain.data.buckets import (
    BucketSpec,
    assign,
    bucket_counts,
    buckets_for_area,
    cache_slices,
    choose_target,
    cover_size,
    crop_box,
    log_aspect_error,
)

KLEIN_1024 = BucketSpec((1024,), 16, 2.0)
MULTI = BucketSpec((512, 768, 1024), 16, 2.0)


@pytest.mark.parametrize("spec", [KLEIN_1024, MULTI, BucketSpec((512,), 8, 3.0), BucketSpec((32,), 4, 2.0)])
def test_buckets_are_multiples_bounded_in_aspect_and_close_to_the_target_area(spec):
    for target in spec.targets:
        area = target * target
        buckets = buckets_for_area(area, spec.multiple, spec.max_aspect)
        assert (target, target) in buckets  # the square itself, when the target is a multiple
        for h, w in buckets:
            assert h % spec.multiple == 0 and w % spec.multiple == 0
            assert max(h / w, w / h) <= spec.max_aspect + 1e-9
            # never above the target (memory), and short of it by less than one step of the long side
            assert area - max(h, w) * spec.multiple < h * w <= area
        # every bucket is listed once, and mirrored: a tall bucket for every wide one
        assert len(set(buckets)) == len(buckets)
        assert {(w, h) for h, w in buckets} == set(buckets)


def test_klein_1024_buckets_are_the_expected_ones():
    buckets = buckets_for_area(1024 * 1024, 16, 2.0)
    assert buckets[0] == (1424, 736) and buckets[-1] == (736, 1424)  # the most elongated within 2:1
    assert (1024, 1024) in buckets and (768, 1360) in buckets  # ~16:9 at 1044480 px² ≤ 1048576
    assert len(buckets) == 37


@pytest.mark.parametrize(
    ("size", "expect_target", "expect_bucket"),
    [
        ((1000, 1000), 768, (768, 768)),  # square, between targets: the largest it reaches (no upscaling)
        ((4000, 1000), 1024, (1424, 736)),  # very tall (4:1): the tallest bucket, the rest is cropped
        ((300, 4000), 1024, (736, 1424)),  # very wide, 1.2 MP ≥ 1024²: the widest bucket of the largest target
        ((20, 30), 512, (416, 624)),  # tiny: the smallest target, scaled up as a square cache would
        ((7, 3), 512, (704, 368)),  # tiny and odd
        ((20_000, 15_000), 1024, (1184, 880)),  # huge 4:3: the largest target, the nearest aspect (1.345)
        ((1080, 1920), 1024, (768, 1360)),  # a 16:9 video frame
        ((512, 512), 512, (512, 512)),  # exactly a target
        ((511, 512), 512, (512, 512)),  # short of every target: the smallest
    ],
)
def test_assignment_of_odd_shapes(size, expect_target, expect_bucket):
    assert choose_target(size, MULTI.targets) == expect_target
    assert assign(size, MULTI) == expect_bucket


def test_assignment_is_the_nearest_aspect_of_all_the_targets_buckets():
    """`assign` bisects; a plain scan of every bucket of the image's target picks the same one."""
    import random

    rng = random.Random(0)
    for spec in (MULTI, BucketSpec((32,), 4, 2.0), BucketSpec((512,), 8, 3.0)):
        for _ in range(3000):
            size = (rng.randint(1, 5000), rng.randint(1, 5000))
            t = choose_target(size, spec.targets)
            scan = min(buckets_for_area(t * t, spec.multiple, spec.max_aspect),
                       key=lambda b: (round(log_aspect_error(size, b), 12), -b[0] * b[1], b[0]))  # fmt: skip
            assert assign(size, spec) == scan, size


def test_every_in_range_aspect_lands_within_half_a_bucket_step():
    """No distortion beyond a crop: an image whose aspect the buckets span is at most half the largest gap between
    neighbouring bucket aspects away from its bucket (in log space); beyond the span, the extreme bucket."""
    buckets = buckets_for_area(1024 * 1024, 16, 2.0)
    logs = sorted(math.log(h / w) for h, w in buckets)
    half_gap = max(b - a for a, b in zip(logs, logs[1:], strict=False)) / 2
    for i in range(-300, 301):
        ratio = math.exp(i / 100 * math.log(4))  # 1:4 … 4:1
        size = (max(1, round(2000 * ratio)), 2000)
        b = assign(size, KLEIN_1024)
        err = log_aspect_error(size, b)
        if logs[0] <= math.log(size[0] / size[1]) <= logs[-1]:
            assert err <= half_gap + 1e-3, (size, b)
        else:  # outside the span: the nearest extreme
            assert b in (buckets[0], buckets[-1])
    assert half_gap < 0.05  # neighbouring 1024-px buckets differ by < 10 % in aspect


@pytest.mark.parametrize("size", [(4000, 1000), (300, 4000), (20, 30), (20_000, 15_000), (1080, 1920), (7, 3)])
def test_cover_and_crop_keep_the_aspect(size):
    """The image is scaled by one factor (aspect kept up to the rounding of one pixel), covers its bucket, and the
    crop box is centred inside it: a crop, never a stretch."""
    bucket = assign(size, MULTI)
    sh, sw = cover_size(size, bucket)
    assert sh >= bucket[0] and sw >= bucket[1]
    assert sh == bucket[0] or sw == bucket[1]  # the smallest cover: one side exact
    # aspect kept: the scaled sides are the same scale of the original up to half a pixel each
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    assert abs(sh - size[0] * scale) <= 0.5 + 1e-9 and abs(sw - size[1] * scale) <= 0.5 + 1e-9
    left, top, right, bottom = crop_box((sh, sw), bucket)
    assert (bottom - top, right - left) == bucket
    assert abs(left - (sw - right)) <= 1 and abs(top - (sh - bottom)) <= 1  # centred


def test_per_bucket_counts_add_up():
    sizes = [(h, w) for h in (200, 333, 512, 900, 1500, 3000) for w in (180, 512, 640, 1024, 2500)]
    counts = bucket_counts(sizes, MULTI)
    assert sum(counts.values()) == len(sizes)
    assert all(n > 0 for n in counts.values()) and list(counts) == [b for b in MULTI.buckets if b in counts]
    assert counts == dict(Counter(assign(s, MULTI) for s in sizes))


def test_cache_slices_group_a_raw_shard_by_bucket_in_raw_order():
    import pyarrow as pa

    sizes = [(64, 32), (32, 32), (60, 30), (33, 33), (62, 31), (32, 64), (40, 40)]
    table = pa.table({"key": [f"k{i}" for i in range(7)], "height": [h for h, _ in sizes],
                      "width": [w for _, w in sizes]})  # fmt: skip
    spec = BucketSpec((32,), 4, 2.0)
    square = [(n, b, t.column("key").to_pylist()) for n, b, t in cache_slices(table, 3, 4, None)]
    assert square == [("cache-00003-0000.parquet", None, ["k0", "k1", "k2", "k3"]),
                      ("cache-00003-0001.parquet", None, ["k4", "k5", "k6"])]  # fmt: skip
    got = [(n, b, t.column("key").to_pylist()) for n, b, t in cache_slices(table, 3, 2, spec)]
    i = {b: k for k, b in enumerate(spec.buckets)}
    assert got == [
        (f"cache-00003-b{i[(24, 40)]:03d}-0000.parquet", (24, 40), ["k5"]),
        (f"cache-00003-b{i[(32, 32)]:03d}-0000.parquet", (32, 32), ["k1", "k3"]),
        (f"cache-00003-b{i[(32, 32)]:03d}-0001.parquet", (32, 32), ["k6"]),
        (f"cache-00003-b{i[(40, 24)]:03d}-0000.parquet", (40, 24), ["k0", "k2"]),
        (f"cache-00003-b{i[(40, 24)]:03d}-0001.parquet", (40, 24), ["k4"]),
    ]


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="pixel multiple"):
        BucketSpec((8,), 16)
    with pytest.raises(ValueError, match="max_aspect"):
        BucketSpec((512,), 16, 0.5)
    with pytest.raises(ValueError, match="positive"):
        assign((0, 10), MULTI)


# ---- the sampler ---------------------------------------------------------------------------------------------------
BUCKETS = [list(range(0, 13)), list(range(13, 20)), list(range(20, 41)), [41, 42]]  # 13, 7, 21, 2 rows
BUCKET_OF = {row: i for i, rows in enumerate(BUCKETS) for row in rows}


def _steps(sampler: BucketSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.batch_size)] for _ in range(n)]


def test_batches_are_homogeneous_disjoint_across_ranks_and_in_lockstep():
    world, bs = 2, 3
    ranks = [BucketSampler(BUCKETS, bs, seed=5, rank=r, world_size=world) for r in range(world)]
    per_epoch = ranks[0].batches_per_epoch
    assert per_epoch == 13 // 6 + 7 // 6 + 21 // 6 + 2 // 6 == 6
    steps = [_steps(s, 2 * per_epoch) for s in ranks]
    for step in range(2 * per_epoch):
        rows = [steps[r][step] for r in range(world)]
        buckets = {BUCKET_OF[i] for batch in rows for i in batch}
        assert len(buckets) == 1, (step, rows)  # one bucket per step, on every rank: same shapes in lockstep
        assert not set(rows[0]) & set(rows[1])  # disjoint rows
    for epoch in range(2):  # within an epoch no row is seen twice, and every bucket gives its whole batches
        seen = [i for r in range(world) for b in steps[r][epoch * per_epoch : (epoch + 1) * per_epoch] for i in b]
        assert len(seen) == len(set(seen)) == per_epoch * world * bs
        by_bucket = Counter(BUCKET_OF[i] for i in seen)
        assert by_bucket == {0: 12, 1: 6, 2: 18}  # the 2-row bucket is smaller than a global batch: never used
    # the epochs differ (reshuffled), but each is a pure function of (seed, epoch)
    assert steps[0][:per_epoch] != steps[0][per_epoch:]
    assert bucket_batches(BUCKETS, 6, 5, 1, True) == bucket_batches(BUCKETS, 6, 5, 1, True)
    assert bucket_batches(BUCKETS, 6, 5, 1, True) != bucket_batches(BUCKETS, 6, 6, 1, True)


def test_resume_mid_epoch_continues_exactly():
    straight = _steps(BucketSampler(BUCKETS, 2, seed=3, rank=1, world_size=2), 40)
    for stop in (1, 4, 8, 9, 23):  # inside an epoch, at its end (9 batches an epoch), in a later one
        first = BucketSampler(BUCKETS, 2, seed=3, rank=1, world_size=2)
        assert first.batches_per_epoch == 13 // 4 + 7 // 4 + 21 // 4 == 9
        epoch, batch = first.position_after(stop)
        resumed = BucketSampler(BUCKETS, 2, seed=3, rank=1, world_size=2, start_epoch=epoch, start_batch=batch)
        assert _steps(resumed, 40 - stop) == straight[stop:]


def test_unshuffled_order_is_bucket_by_bucket():
    batches = bucket_batches(BUCKETS, 4, 0, 0, shuffle=False)
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [13, 14, 15, 16], [20, 21, 22, 23],
                       [24, 25, 26, 27], [28, 29, 30, 31], [32, 33, 34, 35], [36, 37, 38, 39]]  # fmt: skip


def test_no_bucket_holding_a_global_batch_is_refused():
    with pytest.raises(ValueError, match="bucket sizes \\[13, 7, 21, 2\\]"):
        BucketSampler(BUCKETS, 11, seed=0, world_size=2)
