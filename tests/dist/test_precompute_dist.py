"""Precompute on 2 CPU processes (`accelerate launch`, gloo): one rank SIGKILLed mid-run, the launch rerun; each rank
continues its own share, and the merged cache equals a one-process run row for row, bit for bit: a square cache
(shared by cache shard), an aspect-ratio-bucketed one and a mixed Wan video cache (shared by whole raw shard). Plus
the pieces: the shard plan and the ranks' shares, the gather into one-process order, the merge's check, and the
writer thread's ordering and errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flowtrain.data.manifest import CacheError
from flowtrain.data.precompute_dist import Unit, gather, merge, merge_whole, plan, raw_share, share
from flowtrain.data.writer import ShardWriter
from flowtrain.testing.data import make_image_folder, tiny_config_dict
from flowtrain.testing.launch import accelerate_launch, cpu_env, ddp_args, run

PORT = 29611
TIMEOUT = 900  # a launch takes ~30 s on an idle 2-core machine; the suite shares the cores
IMAGES, RAW_SHARD = 96, 3  # 32 raw shards of 3 images → 32 cache shards, 16 per rank


# ------------------------------------------------------------------------------------------------ plan and share
def test_plan_cuts_each_raw_shard_into_cache_shards_in_order():
    units = plan([{"rows": 5}, {"rows": 2}, {"rows": 0}, {"rows": 3}], rows_per_shard=2)
    assert [(u.raw, u.chunk, u.start, u.rows) for u in units] == [
        (0, 0, 0, 2), (0, 1, 2, 2), (0, 2, 4, 1), (1, 0, 0, 2), (3, 0, 0, 2), (3, 1, 2, 1)
    ]  # fmt: skip
    assert units[2].file == "cache-00000-0002.parquet" and units[-1].file == "cache-00003-0001.parquet"


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shares_are_disjoint_and_cover_every_shard(world):
    units = plan([{"rows": r} for r in (10, 3, 7, 1, 12)], rows_per_shard=4)
    shares = [share(units, r, world) for r in range(world)]
    files = [u.file for s in shares for u in s]
    assert sorted(files) == sorted(u.file for u in units) and len(set(files)) == len(units)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        share(units, 2, 2)


def test_merge_names_missing_and_short_shards(tmp_path):
    units = [Unit(0, 0, 0, 2), Unit(1, 0, 0, 2), Unit(2, 0, 0, 2)]
    pq.write_table(pa.table({"key": ["a", "b"]}), tmp_path / units[0].file)
    pq.write_table(pa.table({"key": ["c"]}), tmp_path / units[1].file)  # a shard from another raw slice
    with pytest.raises(CacheError, match=r"2 of 3 cache shards.*cache-00001-0000.parquet \(1 rows, expected 2\)"):
        merge(tmp_path, units)
    pq.write_table(pa.table({"key": ["c", "d"]}), tmp_path / units[1].file)
    pq.write_table(pa.table({"key": ["e", "f"]}), tmp_path / units[2].file)
    assert merge(tmp_path, units) == [{"file": u.file, "rows": 2} for u in units]
    assert not (tmp_path / "precompute_ranks.json").exists()  # one process: nothing to account for


def test_merge_folds_the_rank_records(tmp_path):
    from flowtrain.data.precompute_dist import Ranks, write_rank_record

    units = plan([{"rows": 2}, {"rows": 2}], rows_per_shard=2)
    for u in units:
        pq.write_table(pa.table({"key": ["a", "b"]}), tmp_path / u.file)
    write_rank_record(tmp_path, Ranks(0, 2), [units[0].file], [])
    write_rank_record(tmp_path, Ranks(1, 2), [], [units[1].file])
    merge(tmp_path, units, world_size=2)
    record = json.loads((tmp_path / "precompute_ranks.json").read_text())
    assert record["ranks"][0]["encoded"] == [units[0].file] and record["ranks"][1]["reused"] == [units[1].file]
    assert not list(tmp_path.glob("precompute-rank-*"))


# ------------------------------------------------------------------------------- whole raw shards (buckets, clips)
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_raw_shares_are_disjoint_cover_every_raw_shard_and_ignore_what_is_done(world):
    shares = [raw_share(10, r, world) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(10))
    assert all(s == sorted(s) for s in shares)  # each rank reads its raw shards in raw order
    assert raw_share(10, 0, world) == list(range(0, 10, world))  # a pure function of the count: a rerun's too
    with pytest.raises(ValueError, match="rank 3 is not in 0..2"):
        raw_share(10, 3, 3)


def _cut(raw: int) -> dict:
    """A raw shard's planned entries as precompute records them: two buckets' shards, the second of 2 rows."""
    shards = [{"file": f"cache-{raw:05d}-b{b:03d}-0000.parquet", "rows": 1 + b, "bucket": [32, 32]} for b in (0, 1)]
    return {"raw": raw, "shards": shards, "left_out": raw % 2}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gather_puts_the_ranks_entries_in_one_process_order(world):
    one_process = [e for raw in range(5) for e in _cut(raw)["shards"]]
    planned = [[_cut(raw) for raw in raw_share(5, r, world)] for r in range(world)]
    assert gather(planned, 5) == (one_process, 2)
    with pytest.raises(ValueError, match=r"rank 0 of 2 planned raw shards \[0\], its share is \[0, 2, 4\]"):
        gather([[_cut(0)], [_cut(1), _cut(3)]], 5)  # a record of another launch


def test_merge_whole_checks_the_shards_and_folds_the_records(tmp_path):
    from flowtrain.data.precompute_dist import Ranks, write_rank_record

    planned = [[_cut(0), _cut(2)], [_cut(1)]]
    for items in planned:
        for e in (e for p in items for e in p["shards"]):
            pq.write_table(pa.table({"key": [f"{e['file']}-{i}" for i in range(e["rows"])]}), tmp_path / e["file"])
    write_rank_record(tmp_path, Ranks(0, 2), ["cache-00000-b000-0000.parquet"], [], planned[0])
    with pytest.raises(CacheError, match=r"no record of the cache shards of rank\(s\) \[1\]"):
        merge_whole(tmp_path, 3, world_size=2)
    write_rank_record(tmp_path, Ranks(1, 2), [], ["cache-00001-b000-0000.parquet"], planned[1])
    (tmp_path / "cache-00002-b001-0000.parquet").unlink()
    with pytest.raises(CacheError, match=r"1 of 6 cache shards.*cache-00002-b001-0000.parquet \(FileNotFound"):
        merge_whole(tmp_path, 3, world_size=2)
    pq.write_table(pa.table({"key": ["a", "b"]}), tmp_path / "cache-00002-b001-0000.parquet")
    shards, left_out = merge_whole(tmp_path, 3, world_size=2)
    assert shards == [e for raw in range(3) for e in _cut(raw)["shards"]] and left_out == 1
    record = json.loads((tmp_path / "precompute_ranks.json").read_text())
    assert record["ranks"][1] == {
        "rank": 1,
        "world_size": 2,
        "encoded": [],
        "reused": ["cache-00001-b000-0000.parquet"],
    }
    assert not list(tmp_path.glob("precompute-rank-*"))
    assert merge_whole(tmp_path, 3, own=[_cut(0), _cut(1), _cut(2)]) == (shards, 1)  # one process: no records
    assert not (tmp_path / "precompute_ranks.json").exists()


# ------------------------------------------------------------------------------------------------ writer thread
def test_writer_writes_in_order_off_the_calling_thread_and_bounds_pending(tmp_path):
    release, threads, started = threading.Event(), [], []

    def write(table, path):
        started.append(path)
        threads.append(threading.current_thread().name)
        release.wait(timeout=30)
        pq.write_table(table, path)

    with ShardWriter(write, max_pending=2) as w:
        w.submit(pa.table({"x": [0]}), tmp_path / "a.parquet")
        w.submit(pa.table({"x": [1]}), tmp_path / "b.parquet")  # returns at once: the encoders do not wait
        blocked = threading.Thread(target=w.submit, args=(pa.table({"x": [2]}), tmp_path / "c.parquet"))
        blocked.start()
        blocked.join(timeout=0.5)
        assert blocked.is_alive()  # a third pending table waits for the oldest write (bounded memory)
        release.set()
        blocked.join(timeout=30)
    assert [p.name for p in w.written] == ["a.parquet", "b.parquet", "c.parquet"]
    assert [pq.read_table(tmp_path / f"{n}.parquet")["x"][0].as_py() for n in "abc"] == [0, 1, 2]
    assert set(threads) != {threading.current_thread().name}


def test_writer_error_reaches_the_encoding_loop_and_finished_shards_stay(tmp_path):
    def write(table, path):
        if path.name == "bad.parquet":
            raise OSError(28, "No space left on device")
        pq.write_table(table, path)

    w = ShardWriter(write, max_pending=1)
    w.submit(pa.table({"x": [0]}), tmp_path / "bad.parquet")
    with pytest.raises(OSError, match="No space left") as e:
        w.submit(pa.table({"x": [1]}), tmp_path / "next.parquet")
    assert any("bad.parquet" in n for n in e.value.__notes__)
    w.close()

    # The encoding loop fails: what it handed over is still written, and its error is the one raised.
    with pytest.raises(KeyError, match="encoder"), ShardWriter(write) as w:
        w.submit(pa.table({"x": [2]}), tmp_path / "done.parquet")
        raise KeyError("encoder")
    assert pq.read_table(tmp_path / "done.parquet")["x"].to_pylist() == [2]


# ------------------------------------------------------------------------------------------------ 2 processes
def _worker_pids(tag: str) -> dict[int, int]:
    """{rank: pid} of the launched workers carrying the environment tag `tag` (torchrun sets RANK in each)."""
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"FLOWTRAIN_TEST_TAG") == tag.encode() and b"RANK" in env and b"LOCAL_RANK" in env:
            found[int(env[b"RANK"])] = pid
    return found


def _finished(out: Path) -> dict[str, int]:
    """{cache shard: st_ino} of the shards written completely (renamed from their temporary name)."""
    return {p.name: p.stat().st_ino for p in out.glob("cache-*.parquet")} if out.exists() else {}


def _content(cache: Path) -> tuple[dict, dict[str, dict]]:
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.pop("created")
    return manifest, {s["file"]: pq.read_table(cache / s["file"]).to_pydict() for s in manifest["shards"]}


def _killed_then_rerun(out: Path, precompute: list[str], port: int, first: Callable[[set[str]], bool]):
    """Launch `precompute` on 2 CPU processes into `out`, SIGKILL rank 1 once `first(finished shard names)` holds
    (as a lost node would die; torchrun then stops rank 0), and rerun the same launch to the end. Returns the
    shards the killed run had finished ({name: st_ino}) and the rerun's output; asserts that the rerun wrote none
    of them again."""
    tag = str(out)
    env = cpu_env({"FLOWTRAIN_TEST_TAG": tag})
    launch = accelerate_launch([*ddp_args(2, port), *precompute, "--out", str(out)])
    log_path = out.with_name(out.name + "-killed.log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(launch, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not first(set(_finished(out))):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(_worker_pids(tag)[1], signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        for pid in [*_worker_pids(tag).values(), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    before = _finished(out)
    assert not (out / "manifest.json").exists()
    try:
        outputs = run(launch, env, TIMEOUT)
    except AssertionError as e:  # the rank's one-line error sits above torchrun's long summary: show it
        raise AssertionError("\n".join(ln for ln in str(e).splitlines() if "error" in ln.lower())) from e
    after = _finished(out)
    assert {f: after[f] for f in before} == before  # each rank continued: no finished shard was written again
    return before, outputs


def _assert_accounts(out: Path, before: set[str], own: Callable[[int], set[str]]) -> None:
    """Each rank encoded only its own share (`own(rank)`, shard names), and of it only what the killed run had not
    finished; the per-rank records are folded into one account."""
    record = json.loads((out / "precompute_ranks.json").read_text())
    assert record["world_size"] == 2 and [r["rank"] for r in record["ranks"]] == [0, 1]
    for r in record["ranks"]:
        assert set(r["reused"]) == own(r["rank"]) & before and set(r["encoded"]) == own(r["rank"]) - before
        assert "planned" not in r  # the entries are in the manifest
    assert not list(out.glob("precompute-rank-*"))
    assert not list(out.glob("*.tmp"))


def _raw_of(shard: str) -> int:
    return int(shard.split("-")[1])


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_killed_and_rerun_equal_one_process(tiny_pipeline_dir, tmp_path):
    from flowtrain.data.prepare import prepare

    raw = tmp_path / "raw"
    prepare(make_image_folder(tmp_path / "images", n=IMAGES), raw, shard_size=RAW_SHARD, progress=False)
    config = tmp_path / "precompute.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_pipeline_dir, tmp_path / "unused", tmp_path / "run")))
    precompute = ["-m", "flowtrain", "precompute", str(raw), "--config", str(config), "--resolution", "32"]
    precompute += ["--batch-size", "1", "--quiet"]
    # The reference: one process, in a child with the same one intra-op thread as each launched rank (the same
    # kernels, so the same bits).
    run([sys.executable, *precompute, "--out", str(tmp_path / "one")], cpu_env(), TIMEOUT)

    out = tmp_path / "two"
    # Kill once each rank has finished a shard.
    before, outputs = _killed_then_rerun(out, precompute, PORT, lambda done: {_one(0), _one(1)} <= done)
    assert 2 <= len(before) < IMAGES // RAW_SHARD, "the run was not stopped half-way: raise IMAGES"
    assert {_raw_of(f) % 2 for f in before} == {0, 1}
    assert outputs.count("precompute: 96 rows") == 1  # said once, by the main rank
    units = plan(json.loads((raw / "manifest.json").read_text())["shards"], rows_per_shard=256)
    _assert_accounts(out, set(before), lambda rank: {u.file for u in share(units, rank, 2)})
    want_manifest, want_shards = _content(tmp_path / "one")
    got_manifest, got_shards = _content(out)
    assert got_manifest == want_manifest
    assert got_shards == want_shards  # every row, every column, every bit


def _one(raw: int) -> str:
    return f"cache-{raw:05d}-0000.parquet"


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_killed_and_rerun_equal_one_process_with_buckets(tiny_pipeline_dir, tmp_path):
    """Aspect-ratio buckets: each rank cuts and encodes whole raw shards (a shard's buckets are known only from its
    rows), and the main rank's manifest lists the same bucket shards, in the same order, as one process's."""
    from flowtrain.data.prepare import prepare
    from flowtrain.testing.buckets import MIXED_SIZES, make_mixed_image_folder

    raw = tmp_path / "raw"
    images = make_mixed_image_folder(tmp_path / "images", MIXED_SIZES * 4)  # 64 images in 4 buckets
    prepare(images, raw, shard_size=2, progress=False)  # 32 raw shards, 16 a rank, 1 or 2 buckets each
    config = tmp_path / "precompute.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_pipeline_dir, tmp_path / "unused", tmp_path / "run")))
    precompute = ["-m", "flowtrain", "precompute", str(raw), "--config", str(config), "--resolution", "32"]
    precompute += ["--buckets", "--batch-size", "1", "--quiet"]
    run([sys.executable, *precompute, "--out", str(tmp_path / "one")], cpu_env(), TIMEOUT)
    want_manifest, want_shards = _content(tmp_path / "one")
    assert len({tuple(s["bucket"]) for s in want_manifest["shards"]}) == 4

    out = tmp_path / "two"
    before, outputs = _killed_then_rerun(  # once each rank has finished a shard of its first raw shard
        out, precompute, PORT + 1, lambda done: {_raw_of(f) for f in done} >= {0, 1}
    )
    assert {_raw_of(f) % 2 for f in before} == {0, 1}
    assert 2 <= len(before) < len(want_shards), "the run was not stopped half-way: raise the image count"
    assert outputs.count(f"precompute: {len(MIXED_SIZES) * 4} rows") == 1  # said once, by the main rank
    _assert_accounts(out, set(before), lambda rank: {f for f in want_shards if _raw_of(f) % 2 == rank})
    got_manifest, got_shards = _content(out)
    assert got_manifest == want_manifest  # the same shards, buckets and shapes, in the same order
    assert got_shards == want_shards  # every row, every column, every bit


def _mixed_video_folder(root: Path, videos: int, images: int) -> Path:
    """`videos` 7-frame .mp4 clips (a bright square moving over noise) and `images` stills, captioned, named so
    that sorted they alternate: raw shards of 2 hold both kinds."""
    import numpy as np
    from PIL import Image

    from flowtrain.data.video import write_video

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(videos):
        frames = (rng.random((7, 32, 32, 3)) * 60).astype(np.uint8)
        for f in range(7):
            frames[f, 8:20, 2 + 2 * f : 14 + 2 * f] = 230
        write_video(root / f"{i:02d}-v.mp4", frames, fps=8)
        (root / f"{i:02d}-v.txt").write_text(f"a square moving right {i}")
    for i in range(images):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / f"{2 * i:02d}-s.png")
        (root / f"{2 * i:02d}-s.txt").write_text(f"a still image {i}")
    return root


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_killed_and_rerun_equal_one_process_with_video_clips(tmp_path):
    """Wan, videos and images in one cache: each rank cuts its whole raw shards into clips (5-frame clips and
    one-frame images in shards of their own), and the merged manifest equals one process's, frames and all."""
    from flowtrain.data.prepare import prepare
    from flowtrain.models.wan.tiny import save_tiny_pipeline

    pipeline = save_tiny_pipeline(tmp_path / "wan")
    raw = tmp_path / "raw"
    prepare(_mixed_video_folder(tmp_path / "src", videos=12, images=6), raw, shard_size=2, progress=False)
    precompute = ["-m", "flowtrain", "precompute", str(raw), "--model", str(pipeline), "--resolution", "32"]
    precompute += ["--dtype", "float32", "--batch-size", "1", "--quiet", "model.max_sequence_length=32"]
    precompute += ["dataset.video.frames=5"]
    run([sys.executable, *precompute, "--out", str(tmp_path / "one")], cpu_env(), TIMEOUT)
    want_manifest, want_shards = _content(tmp_path / "one")
    assert {s.get("frames") for s in want_manifest["shards"]} == {None, 1}  # 5-frame clips and images

    out = tmp_path / "two"
    before, outputs = _killed_then_rerun(out, precompute, PORT + 2, lambda done: {_raw_of(f) for f in done} >= {0, 1})
    assert {_raw_of(f) % 2 for f in before} == {0, 1}
    assert 2 <= len(before) < len(want_shards), "the run was not stopped half-way: raise the video count"
    rows = sum(s["rows"] for s in want_manifest["shards"])
    assert outputs.count(f"precompute: {rows} rows") == 1  # said once, by the main rank
    _assert_accounts(out, set(before), lambda rank: {f for f in want_shards if _raw_of(f) % 2 == rank})
    got_manifest, got_shards = _content(out)
    assert got_manifest == want_manifest  # the same clip shards, frame counts and shapes, in the same order
    assert got_shards == want_shards  # every row, every column, every bit
