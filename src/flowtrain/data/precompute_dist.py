"""Precompute on N processes (`accelerate launch -m flowtrain precompute ...`): the plan of the work, each rank's
disjoint share of it, and the main rank's merge of the finished shards into one manifest.

Square image caches: the unit of work is one cache shard, a slice of at most `rows_per_shard` rows of one raw shard,
named `cache-{raw:05d}-{chunk:04d}.parquet` from its place in the raw folder alone (`plan`, `share`, `merge`).
Aspect-ratio-bucketed and video-clip caches: a cache shard's name and rows depend on each row's bucket or clips,
known only while a raw shard is read, so the unit is a whole raw shard (`raw_share`, `merge_whole`); each rank
records the manifest entries its raw shards gave, and the main rank puts them in raw order.

Either plan is a pure function of the raw manifest, so every rank computes the same plan without talking to the
others, a rank's share does not depend on which shards are already done (a rerun after a kill gives each rank the
same work, and each skips the cache shards it finished), and the merged cache lists the same shards, in the same
order, as a one-process run. Processes only meet at two barriers: after the main rank has set the output folder up,
and before it merges.

On several processes, each rank records what it did in `precompute-rank-{rank}.json` (the shards it encoded, the
ones an earlier run had finished, and for a whole-raw-shard cache the manifest entries of its raw shards); the main
rank folds the accounts into `precompute_ranks.json`, the account of the last run, next to the manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq

from flowtrain.data.manifest import CacheError

# How long a rank may wait at a barrier for the others: ranks finish their shares at different times, and a share
# of a large dataset is hours of encoding. A failed rank does not leave the others waiting this long: the launcher
# stops every process when one exits with an error.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Unit:
    """One cache shard to write: rows [start, start + rows) of raw shard `raw` (the `raw`-th in the manifest)."""

    raw: int
    chunk: int
    start: int
    rows: int

    @property
    def file(self) -> str:
        return f"cache-{self.raw:05d}-{self.chunk:04d}.parquet"


def plan(raw_shards: list[dict], rows_per_shard: int) -> list[Unit]:
    """Every cache shard of a raw folder, in cache order; `raw_shards` is the raw manifest's `shards` ([{rows}])."""
    return [
        Unit(raw, chunk, start, min(rows_per_shard, s["rows"] - start))
        for raw, s in enumerate(raw_shards)
        for chunk, start in enumerate(range(0, s["rows"], rows_per_shard))
    ]


def share(units: list[Unit], rank: int, world_size: int) -> list[Unit]:
    """Rank `rank`'s units: every `world_size`-th, from the `rank`-th. Disjoint over the ranks, together all units;
    cache shards are equally full except each raw shard's last, so ranks get nearly equal rows."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return units[rank::world_size]


def raw_share(n_raw: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s raw shards (indices into the raw manifest's `shards`) for a cache cut per raw shard (buckets,
    clips): every `world_size`-th, from the `rank`-th. Disjoint over the ranks, together all `n_raw`; `prepare`
    writes raw shards of equal size but the last, so ranks get nearly equal rows."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return list(range(rank, n_raw, world_size))


@dataclass
class Ranks:
    """This process's place in the launch: rank, world size, a barrier, and the device a rank encodes on."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None  # None: precompute's own default (one process)
    barrier: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_ranks(device: str | None = None) -> Ranks:
    """One process unless the launcher started several (WORLD_SIZE > 1); then accelerate's process group, which
    also gives each rank its own accelerator (cuda:LOCAL_RANK), or the CPU when `device` is "cpu", the launch asked
    for it (ACCELERATE_USE_CPU=true) or the machine has no accelerator."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from accelerate.utils.imports import get_torch_accelerator_backend

    # `PartialState(cpu=False)` on a machine without an accelerator is not distributed at all: every process
    # would think it is the only one and encode everything. `Accelerator` reads the flag itself; PartialState not.
    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or get_torch_accelerator_backend()[0] is None
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    if state.num_processes != world:
        raise RuntimeError(
            f"the launcher started {world} processes, but accelerate set up {state.num_processes} "
            f"({state.distributed_type}); precompute would encode every shard in each of them"
        )
    return Ranks(state.process_index, state.num_processes, str(state.device), state.wait_for_everyone)


RANK_RECORD = "precompute-rank-{rank}.json"
RANKS_RECORD = "precompute_ranks.json"


def write_rank_record(
    out: Path, ranks: Ranks, encoded: list[str], reused: list[str], planned: list[dict] | None = None
) -> None:
    """This rank's account of its share (atomically: a killed rank leaves none, or an earlier run's). `planned`:
    for a whole-raw-shard cache, [{raw, shards, left_out}] per raw shard of the share (`merge_whole`)."""
    path = out / RANK_RECORD.format(rank=ranks.rank)
    record = {"rank": ranks.rank, "world_size": ranks.world_size, "encoded": encoded, "reused": reused}
    if planned is not None:
        record["planned"] = planned
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def merge(out: Path, units: list[Unit], world_size: int = 1) -> list[dict]:
    """A square cache's manifest `shards` after every rank has finished: each planned shard must be in `out` with
    its row count (read from its footer); a CacheError names the ones that are not (a rank that died, a full disk).
    The ranks' records are folded into RANKS_RECORD."""
    shards = [{"file": u.file, "rows": u.rows} for u in units]
    _check_written(out, shards)
    _fold_records(out, world_size, _read_records(out, world_size))
    return shards


def merge_whole(out: Path, n_raw: int, world_size: int = 1, own: list[dict] | None = None) -> tuple[list[dict], int]:
    """A whole-raw-shard cache's (buckets, clips) manifest `shards` after every rank has finished, and how many raw
    rows gave no clip. On one process `own` is the run's [{raw, shards, left_out}]; on several, each rank's comes
    from its record. Every entry's shard must be in `out` with its row count; the ranks' records are folded into
    RANKS_RECORD."""
    records = _read_records(out, world_size) if world_size > 1 else [{"planned": own}]
    missing = [rank for rank, r in enumerate(records) if r is None or r.get("planned") is None]
    if missing:
        raise CacheError(
            f"{out}: no record of the cache shards of rank(s) {missing} after every process finished; rerun the "
            "same `flowtrain precompute` command (it continues where it stopped)"
        )
    shards, left_out = gather([r["planned"] for r in records], n_raw)
    _check_written(out, shards)
    _fold_records(out, world_size, records)
    return shards, left_out


def gather(planned: list[list[dict]], n_raw: int) -> tuple[list[dict], int]:
    """The ranks' per-raw-shard entries (rank r's `planned`: [{raw, shards, left_out}] for `raw_share(n_raw, r,
    len(planned))`) as one manifest's `shards`, in raw order and within a raw shard in the order it was cut: the
    order one process writes. Plus the raw rows that gave no clip, summed. ValueError when the ranks' raw shards
    are not exactly their shares (a record of another launch)."""
    by_raw: dict[int, dict] = {}
    for rank, items in enumerate(planned):
        got, want = [p["raw"] for p in items], raw_share(n_raw, rank, len(planned))
        if got != want:
            raise ValueError(f"rank {rank} of {len(planned)} planned raw shards {got}, its share is {want}")
        by_raw |= {p["raw"]: p for p in items}
    parts = [by_raw[i] for i in range(n_raw)]
    return [e for p in parts for e in p["shards"]], sum(p.get("left_out", 0) for p in parts)


def _check_written(out: Path, shards: list[dict]) -> None:
    """Each of `shards` ([{file, rows}]) is in `out` with its row count (its footer's); a CacheError names the
    ones that are not."""
    missing = []
    for s in shards:
        path = out / s["file"]
        try:
            rows = pq.read_metadata(path).num_rows
        except (OSError, ValueError) as e:
            missing.append(f"{s['file']} ({e.__class__.__name__})")
            continue
        if rows != s["rows"]:
            missing.append(f"{s['file']} ({rows} rows, expected {s['rows']})")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CacheError(
            f"{out}: {len(missing)} of {len(shards)} cache shards are missing or incomplete after every process "
            f"finished: {shown}; rerun the same `flowtrain precompute` command (it continues where it stopped)"
        )


def _read_records(out: Path, world_size: int) -> list[dict | None]:
    """Each rank's record of this run (None where unreadable); none on one process."""
    if world_size == 1:
        return []
    records: list[dict | None] = []
    for rank in range(world_size):
        try:
            records.append(json.loads((out / RANK_RECORD.format(rank=rank)).read_text()))
        except (OSError, ValueError):
            records.append(None)
    return records


def _fold_records(out: Path, world_size: int, records: list[dict | None]) -> None:
    """The ranks' accounts (what each encoded and reused; not the planned entries, which the manifest now holds)
    into RANKS_RECORD, and the per-rank records removed. One process: an earlier multi-process run's account is
    stale, and removed."""
    if world_size == 1:
        (out / RANKS_RECORD).unlink(missing_ok=True)
        return
    accounts = [
        {k: v for k, v in r.items() if k != "planned"} if r is not None  # an account only: the shards were checked
        else {"rank": rank, "world_size": world_size, "encoded": None, "reused": None}
        for rank, r in enumerate(records)
    ]  # fmt: skip
    tmp = out / f"{RANKS_RECORD}.tmp"
    tmp.write_text(json.dumps({"world_size": world_size, "ranks": accounts}, indent=1))
    tmp.replace(out / RANKS_RECORD)
    for p in out.glob(RANK_RECORD.format(rank="*") + "*"):  # and a killed write's temporary file
        p.unlink(missing_ok=True)
