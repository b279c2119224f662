"""Two CPU processes under `flowtrain launch` (accelerate launch, gloo): a failure on one rank stops both.

Each cause is seen by rank 1 only, at step 3, after checkpoint-1 and checkpoint-2 were written: a NaN row only
rank 1 reads (real data), an exception (`FLOWTRAIN_TEST_FAULT` hook), a failed write of rank 1's part of
checkpoint-3 (hook), a rank that hangs (hook). Every run must end by itself (the subprocess timeout is far below
the default collective timeout, so the fast path is what ends them), print the failing rank's message once, exit
non-zero, and leave checkpoint-2 intact. SIGTERM to rank 1 alone must make both ranks write the same checkpoint and
the launcher exit 75, and the run must resume from it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flowtrain.data.tensors import column_to_tensor, tensor_column
from flowtrain.testing import killharness as kh
from flowtrain.testing.data import tiny_config_dict
from flowtrain.train.checkpoint import list_checkpoints, verify_checkpoint
from flowtrain.train.errors import EXIT_CHECKPOINT_WRITE, EXIT_INTERRUPTED, EXIT_PEER_FAILED, EXIT_USER_ERROR
from flowtrain.train.faults import TEST_FAULT_ENV

pytestmark = pytest.mark.dist

PORTS = iter(range(29660, 29700))  # this file's share of the ports; every launch takes its own
PEER_LINE = "another process of this run failed; its own error message is above"


def _config(tmp_path: Path, cache: Path, pipeline: Path, **train) -> Path:
    """Batch 1 per rank, no shuffling: step s reads row 2(s-1) on rank 0 and row 2(s-1)+1 on rank 1."""
    d = tiny_config_dict(pipeline, cache, tmp_path / "unused", max_steps=6, batch_size=1, log_every=1, **train)
    d["dataset"]["shuffle"] = False
    d["checkpoint"] = {"every_steps": 1, "keep_last": None}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _launch_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowtrain", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(next(PORTS)),
            "-m", "flowtrain", "train", str(cfg), f"output_dir={out}", "--quiet", *extra]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    return kh.child_env({"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **extra})


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _steps_saved(out: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(out)]


def _assert_stopped_at_3_with_2_intact(out: Path) -> None:
    assert _steps_saved(out) == [1, 2]
    assert all(verify_checkpoint(p) is None for _, p in list_checkpoints(out))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")]  # no half-written folder
    assert json.loads((out / "checkpoint-2" / "state.json").read_text())["world_size"] == 2


def _nan_row_cache(src: Path, dst: Path, row: int) -> Path:
    """A copy of the cache with one row group per row (the NaN check reads whole row groups) and NaN in `row`."""
    shutil.copytree(src, dst)
    (shard,) = dst.glob("cache-*.parquet")
    table = pq.read_table(shard)
    latents = column_to_tensor(table.column("latent_moments"), "float32")
    latents[row].view(-1)[3] = float("nan")
    columns = {name: table.column(name) for name in table.column_names}
    columns["latent_moments"] = tensor_column(latents, "float32")
    pq.write_table(pa.table(columns), shard, row_group_size=1)
    return dst


_GLOO_SCRIPT = """
import json, os, sys, time, datetime
import multiprocessing as mp
from pathlib import Path


def worker(rank, port, out):
    import torch, torch.distributed as dist
    from flowtrain.train.failures import one_failure_stops_all
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(minutes=30))
    dist.all_reduce(torch.ones(1))
    try:
        with one_failure_stops_all(Path(out), 30.0):
            if rank == 1:
                time.sleep(0.5)  # rank 0 is waiting in the all-reduce by then
                raise ValueError("bad row on rank 1")
            dist.all_reduce(torch.ones(1))
    except BaseException as e:
        Path(out, f"rank{rank}.json").write_text(json.dumps([type(e).__name__, str(e), time.time()]))
    if rank == 1:  # rank 1 lingers after its failure: rank 0 must not need it to exit to stop waiting
        time.sleep(3)
        Path(out, "rank1-exits").write_text(json.dumps(time.time()))


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, int(sys.argv[1]), sys.argv[2])) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join()
    print("rank 0 done", flush=True)
    procs[1].join()
"""


def test_exception_on_one_process_fails_the_others_collective_at_once(tmp_path):
    """The mechanism alone, on a bare gloo group: rank 1 raises inside `one_failure_stops_all` while rank 0 waits
    in an all-reduce (30-minute timeout); rank 0 gets PeerFailedError while rank 1 is still alive."""
    script = tmp_path / "gloo_failure.py"
    script.write_text(_GLOO_SCRIPT)
    proc = _run([sys.executable, str(script), str(next(PORTS)), str(tmp_path)], _env(), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:]
    kind1, msg1, _ = json.loads((tmp_path / "rank1.json").read_text())
    kind0, msg0, failed_at = json.loads((tmp_path / "rank0.json").read_text())
    assert (kind1, msg1) == ("ValueError", "bad row on rank 1")  # the cause, unchanged, on its own rank
    assert kind0 == "PeerFailedError" and PEER_LINE in msg0 and "no checkpoint was written yet" in msg0
    assert failed_at < json.loads((tmp_path / "rank1-exits").read_text())  # rank 1 was still alive


def test_nan_row_read_by_one_rank_stops_both(tiny_pipeline_dir, tiny_cache, tmp_path):
    cache = _nan_row_cache(tiny_cache[1], tmp_path / "cache", row=5)  # rank 1's row at step 3
    out = tmp_path / "run"
    proc = _run(_launch_cmd(_config(tmp_path, cache, tiny_pipeline_dir), out), _env())
    log = proc.stdout
    assert proc.returncode == EXIT_USER_ERROR, log[-3000:]  # the launcher returns rank 1's own exit code
    assert log.count("row 5 (key 'img05') has NaN/inf values") == 1, log[-3000:]
    # rank 0 hears it from gloo: rank 1's socket closed, or reset when rank 1 is gone already (it exits at once)
    assert any(f"Connection {how} by peer" in log for how in ("closed", "reset")), log[-3000:]
    assert "flowtrain launch: processes failed" in log
    _assert_stopped_at_3_with_2_intact(out)


@pytest.mark.slow  # the same path as the NaN row (a local exception closes the process group), another cause
def test_exception_on_one_rank_stops_both(tiny_pipeline_dir, tiny_cache, tmp_path):
    out = tmp_path / "run"
    cmd = _launch_cmd(_config(tmp_path, tiny_cache[1], tiny_pipeline_dir), out)
    proc = _run(cmd, _env(**{TEST_FAULT_ENV: "step@1:3"}))
    log = proc.stdout
    assert proc.returncode == 1, log[-3000:]  # an unexpected exception: a traceback and exit 1, as in one process
    assert log.count(f"injected exception ({TEST_FAULT_ENV}) on rank 1 at step 3") == 1, log[-3000:]
    # rank 0 says why it stopped in one line, or was already stopped by the launcher: never a traceback of its own
    assert "[rank0]: Traceback" not in log and "rank 1: 1" in log
    _assert_stopped_at_3_with_2_intact(out)


def test_failed_checkpoint_write_on_one_rank_stops_both(tiny_pipeline_dir, tiny_cache, tmp_path):
    out = tmp_path / "run"
    cmd = _launch_cmd(_config(tmp_path, tiny_cache[1], tiny_pipeline_dir), out)
    proc = _run(cmd, _env(**{TEST_FAULT_ENV: "checkpoint@1:3"}))
    log = proc.stdout
    assert proc.returncode == EXIT_CHECKPOINT_WRITE, log[-3000:]
    assert log.count(f"injected write failure ({TEST_FAULT_ENV}) on rank 1 for checkpoint-3") == 1, log[-3000:]
    assert "could not write checkpoint-3" in log and "checkpoint-2 is intact" in log
    _assert_stopped_at_3_with_2_intact(out)


@pytest.mark.slow  # the launcher gives the stuck rank 30 s to exit after SIGTERM before it kills it
def test_stuck_rank_ends_at_the_collective_timeout(tiny_pipeline_dir, tiny_cache, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_cache[1], tiny_pipeline_dir, collective_timeout_minutes=0.25)
    proc = _run(_launch_cmd(cfg, out), _env(**{TEST_FAULT_ENV: "hang@1:3"}))
    log = proc.stdout
    assert proc.returncode != 0, log[-3000:]
    assert "did not take part in a collective for train.collective_timeout_minutes=0.25" in log, log[-3000:]
    assert f"rank 0: {EXIT_PEER_FAILED}" in log
    _assert_stopped_at_3_with_2_intact(out)


def _worker_of_rank(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The training process with RANK=rank among the launcher's descendants (not some other test's workers)."""
    for p in launcher.children(recursive=True):
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return p
    return None


@pytest.mark.slow  # two launches
def test_sigterm_to_one_rank_stops_both_at_one_checkpoint_and_exits_75(tiny_pipeline_dir, tiny_cache, tmp_path):
    cfg = _config(tmp_path, tiny_cache[1], tiny_pipeline_dir)
    out, steps = tmp_path / "run", 40
    overrides = [f"train.max_steps={steps}", "checkpoint.every_steps=null"]
    launcher = subprocess.Popen(_launch_cmd(cfg, out, *overrides), env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics, deadline = out / "logs" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    worker = _worker_of_rank(psutil.Process(launcher.pid), 1)
    assert worker is not None
    os.kill(worker.pid, signal.SIGTERM)  # only rank 1 hears it, as when a node's agent forwards a preemption
    log, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == EXIT_INTERRUPTED, log[-3000:]
    ((step, path),) = list_checkpoints(out)
    assert 3 <= step < steps and verify_checkpoint(path) is None
    saved = {p.name for p in path.iterdir()}
    assert {"rng-rank0.json", "rng-rank1.json", "loop-rank0.json", "loop-rank1.json"} <= saved
    assert f"stopped by SIGTERM at step {step}" in log

    proc = _run(_launch_cmd(cfg, out, *overrides, "--resume_from_checkpoint", "latest"), _env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _steps_saved(out) == [step, steps]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # every step logged once: the run went on where it stopped


def test_launch_of_one_process_returns_its_exit_code(tmp_path):
    """One process: accelerate runs it as a plain subprocess (and would exit 1); `flowtrain launch` returns its 2."""
    missing = tmp_path / "missing.yaml"
    cmd = [sys.executable, "-m", "flowtrain", "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flowtrain", "train", str(missing)]  # fmt: skip
    proc = _run(cmd, _env(), timeout=180)
    assert proc.returncode == EXIT_USER_ERROR, proc.stdout[-3000:]
    assert "missing.yaml" in proc.stdout
