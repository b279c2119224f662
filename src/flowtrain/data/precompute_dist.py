"""Precompute on N processes (`accelerate launch -m flowtrain precompute ...`): the plan of cache shards, each
rank's disjoint share of it, and the main rank's merge of the finished shards into one manifest.

The unit of work is one cache shard: a slice of at most `rows_per_shard` rows of one raw shard, named
`cache-{raw:05d}-{chunk:04d}.parquet` from its place in the raw folder alone. The plan is a pure function of the
raw manifest, so every rank computes the same plan without talking to the others, a rank's share does not
depend on which shards are already done (a rerun after a kill gives each rank the same shards, and each skips
the ones it finished), and the merged cache lists the same shards, in the same order, as a one-process run.
Processes only meet at two barriers: after the main rank has set the output folder up, and before it merges.

On several processes, each rank records what it did in `precompute-rank-{rank}.json` (the shards it encoded, the
ones an earlier run had finished); the main rank folds these into `precompute_ranks.json`, the account of the last
run, next to the manifest.
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


def write_rank_record(out: Path, ranks: Ranks, encoded: list[str], reused: list[str]) -> None:
    """This rank's account of its share (atomically: a killed rank leaves none, or an earlier run's)."""
    path = out / RANK_RECORD.format(rank=ranks.rank)
    record = {"rank": ranks.rank, "world_size": ranks.world_size, "encoded": encoded, "reused": reused}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def merge(out: Path, units: list[Unit], world_size: int = 1) -> list[dict]:
    """The manifest's `shards` after every rank has finished: each planned shard must be in `out` with its row
    count (read from its footer); a CacheError names the ones that are not (a rank that died, a full disk). The
    ranks' records are folded into RANKS_RECORD."""
    shards, missing = [], []
    for u in units:
        path = out / u.file
        try:
            rows = pq.read_metadata(path).num_rows
        except (OSError, ValueError) as e:
            missing.append(f"{u.file} ({e.__class__.__name__})")
            continue
        if rows != u.rows:
            missing.append(f"{u.file} ({rows} rows, expected {u.rows})")
            continue
        shards.append({"file": u.file, "rows": u.rows})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CacheError(
            f"{out}: {len(missing)} of {len(units)} cache shards are missing or incomplete after every process "
            f"finished: {shown}; rerun the same `flowtrain precompute` command (it continues where it stopped)"
        )
    if world_size == 1:  # nothing to account for across processes; an earlier multi-process run's account is stale
        (out / RANKS_RECORD).unlink(missing_ok=True)
        return shards
    records = []
    for rank in range(world_size):
        path = out / RANK_RECORD.format(rank=rank)
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # an account only: the shards themselves were checked above
            records.append({"rank": rank, "world_size": world_size, "encoded": None, "reused": None})
    tmp = out / f"{RANKS_RECORD}.tmp"
    tmp.write_text(json.dumps({"world_size": world_size, "ranks": records}, indent=1))
    tmp.replace(out / RANKS_RECORD)
    for p in out.glob(RANK_RECORD.format(rank="*") + "*"):  # and a killed write's temporary file
        p.unlink(missing_ok=True)
    return shards
