"""DDP on CPU with real processes (`accelerate launch`, gloo): what each rank reads, that N processes × batch b train
like one process × batch N·b, resume on another number of processes, and two "machines" on one host.

One process with batch 4 (run here, in-process) is the reference; the launched runs use batch 2 per process. Every
run draws posterior samples and caption dropout too, so all of a step's random draws are compared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowtrain.testing.data import tiny_config_dict
from flowtrain.testing.launch import ROOT, accelerate_launch, cpu_env, ddp_args, run, run_together

STEPS, ROWS = 6, 8  # the tiny cache has 8 rows: a global batch of 4 is 2 steps an epoch, so 3 epochs
PORTS = {"config_file": 29600, "resume": 29601, "machines": 29602}
TIMEOUT = 900  # a launch takes ~30 s on an idle 2-core machine; the suite shares the cores
LOSS_TOL = {"rel": 1e-5, "abs": 1e-6}  # fp32: a batch of 4 vs two of 2 sums in another order


def write_config(tmp: Path, pipeline: Path, cache: Path, out: Path, batch_size: int, **train) -> Path:
    # `global` draws: a row gets the same σ/noise/dropout whatever the process count (docs/distributed.md)
    train = {"max_steps": STEPS, "caption_dropout": 0.3, "random_draws": "global", **train}
    cfg = tiny_config_dict(pipeline, cache, out, batch_size=batch_size, **train)
    cfg["dataset"]["latent_sampling"] = "sample"
    cfg["checkpoint"] = {"every_steps": 2, "keep_last": None}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def probe_cmd(config: Path, *extra: str) -> list[str]:
    return ["-m", "flowtrain.testing.ddp_probe", str(config), *extra]


def read_probe(out: Path, rank: int) -> dict:
    doc = json.loads((out / f"rank{rank}-rows.json").read_text())
    doc["weights"] = load_file(str(out / f"rank{rank}-weights.safetensors"))
    doc["losses"] = {int(k): v for k, v in doc["losses"].items()}
    return doc


def state(out: Path, step: int) -> dict:
    return json.loads((out / f"checkpoint-{step}" / "state.json").read_text())


def assert_weights_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(tiny_pipeline_dir, tiny_cache, tmp_path_factory) -> tuple[Path, dict]:
    """One process, batch 4, trained here: (output_dir, probe record)."""
    from flowtrain.config import load_config
    from flowtrain.testing.ddp_probe import train_recording, write_probe

    tmp = tmp_path_factory.mktemp("ddp")
    config = write_config(tmp, tiny_pipeline_dir, tiny_cache[1], tmp / "one", batch_size=4)
    cfg = load_config(config)
    write_probe(cfg, *train_recording(cfg), rank=0)
    return tmp / "one", read_probe(tmp / "one", 0)


@pytest.fixture(scope="module")
def two_processes(tiny_pipeline_dir, tiny_cache, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two processes, batch 2 each, launched with the shipped configs/accelerate/ddp.yaml."""
    tmp = tmp_path_factory.mktemp("ddp")
    config = write_config(tmp, tiny_pipeline_dir, tiny_cache[1], tmp / "two", batch_size=2)
    args = ["--config_file", str(ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", "2"]
    args += ["--main_process_port", str(PORTS["config_file"])]
    run(accelerate_launch([*args, *probe_cmd(config)]), cpu_env(), TIMEOUT)
    return tmp / "two", [read_probe(tmp / "two", r) for r in range(2)]


@pytest.mark.dist
def test_ranks_read_disjoint_rows_that_cover_each_epoch(two_processes):
    out, ranks = two_processes
    assert [len(r["rows"]) for r in ranks] == [STEPS, STEPS]
    for step in range(STEPS):
        r0, r1 = ranks[0]["rows"][step], ranks[1]["rows"][step]
        assert len(r0) == len(r1) == 2 and not set(r0) & set(r1), (step, r0, r1)
    per_epoch = 2  # steps
    for e in range(STEPS // per_epoch):
        seen = [i for r in ranks for s in range(e * per_epoch, (e + 1) * per_epoch) for i in r["rows"][s]]
        assert sorted(seen) == list(range(ROWS)), f"epoch {e}: rows {sorted(seen)}"  # each row once an epoch
    # Both ranks ended with the same weights, and they moved (LoRA B starts at zero): gradients were all-reduced.
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(k.endswith("lora_B.default.weight") and w0[k].abs().sum() > 0 for k in w0)
    ckpt = out / f"checkpoint-{STEPS}"
    assert (ckpt / "rng-rank0.json").exists() and (ckpt / "rng-rank1.json").exists()
    assert state(out, STEPS)["world_size"] == 2 and state(out, STEPS)["global_batch"] == 4


@pytest.mark.dist
def test_two_processes_train_like_one_with_twice_the_batch(reference, two_processes):
    one_out, one = reference
    two_out, ranks = two_processes
    # The same global sample order: rank 0's rows then rank 1's are the one process's batch, step by step.
    assert [a + b for a, b in zip(ranks[0]["rows"], ranks[1]["rows"], strict=True)] == one["rows"]
    assert sorted(one["losses"]) == list(range(1, STEPS + 1))
    for step, loss in one["losses"].items():
        assert ranks[0]["losses"][step] == pytest.approx(loss, **LOSS_TOL), step
    assert_weights_close(ranks[0]["weights"], one["weights"])
    for step in (2, 4, 6):  # the data position in checkpoints counts global batches either way
        assert state(two_out, step)["data"] == state(one_out, step)["data"]


@pytest.mark.slow
@pytest.mark.dist
def test_resume_on_another_number_of_processes_continues_the_run(tiny_pipeline_dir, tiny_cache, tmp_path):
    """1 process to step 2 → 2 processes to step 4 → 1 process to step 6, against 1 process throughout.

    Losses are logged every 3 steps, so both switches fall inside a log window: the part of it saved by the old
    processes must carry over to the new ones.
    """
    from flowtrain.config import load_config
    from flowtrain.testing.ddp_probe import train_recording, write_probe

    def config(name: str, batch_size: int) -> Path:
        return write_config(tmp_path, tiny_pipeline_dir, tiny_cache[1], tmp_path / name, batch_size, log_every=3)

    ref_cfg = load_config(config("ref", 4))
    write_probe(ref_cfg, *train_recording(ref_cfg), rank=0)
    ref = read_probe(tmp_path / "ref", 0)
    assert sorted(ref["losses"]) == [3, 6]

    two = tmp_path / "two"  # 2 processes, from the 1-process checkpoint at step 2
    two.mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-2", two / "checkpoint-2")
    launch = [*ddp_args(2, PORTS["resume"]), *probe_cmd(config("two", 2), "--resume", "latest")]
    run(accelerate_launch(launch), cpu_env(), TIMEOUT)
    ranks = [read_probe(two, r) for r in range(2)]
    assert [a + b for a, b in zip(ranks[0]["rows"], ranks[1]["rows"], strict=True)] == ref["rows"][2:]  # steps 3-6
    assert sorted(ranks[0]["losses"]) == [3, 6]
    for step in (3, 6):  # step 3's window holds steps 1-2 of the 1-process run
        assert ranks[0]["losses"][step] == pytest.approx(ref["losses"][step], **LOSS_TOL), step
    for step in (4, 6):
        assert state(two, step)["world_size"] == 2 and state(two, step)["data"] == state(tmp_path / "ref", step)["data"]

    one = tmp_path / "one"  # 1 process again, from the 2-process checkpoint at step 4
    one.mkdir()
    shutil.copytree(two / "checkpoint-4", one / "checkpoint-4")
    result, rows = train_recording(load_config(config("one", 4)), "latest")
    assert result.step == STEPS and rows == ref["rows"][4:]
    assert sorted(result.losses) == [6]  # its window holds step 4 of the 2-process run
    assert result.losses[6] == pytest.approx(ref["losses"][6], **LOSS_TOL)
    assert state(one, STEPS)["world_size"] == 1 and state(one, STEPS)["data"] == state(tmp_path / "ref", STEPS)["data"]
    ckpt = load_file(str(one / f"checkpoint-{STEPS}" / "trainable.safetensors"))
    assert_weights_close(ckpt, ref["weights"])
    assert_weights_close(ranks[0]["weights"], ref["weights"])


@pytest.mark.slow
@pytest.mark.dist
def test_two_machines_of_one_process_agree_with_one_machine_of_two(two_processes, tmp_path):
    """`--num_machines 2 --machine_rank {0,1} --main_process_ip 127.0.0.1`: two launchers side by side, one
    process each, sharing the output folder as nodes share a file system."""
    two_out, ranks = two_processes
    out = tmp_path / "machines"
    cfg = yaml.safe_load((two_out / "config.yaml").read_text())
    cfg["output_dir"] = str(out)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    launchers = [ddp_args(2, PORTS["machines"], machines=2, machine_rank=m) for m in range(2)]
    cmds = [accelerate_launch([*args, *probe_cmd(tmp_path / "m.yaml")]) for args in launchers]
    run_together(cmds, [cpu_env(), cpu_env()], TIMEOUT)
    got = [read_probe(out, r) for r in range(2)]
    for g, want in zip(got, ranks, strict=True):
        assert g["rows"] == want["rows"]
        assert g["losses"].keys() == want["losses"].keys()
        for step, loss in want["losses"].items():
            assert g["losses"][step] == pytest.approx(loss, **LOSS_TOL), step
        assert_weights_close(g["weights"], want["weights"])
    assert state(out, STEPS)["world_size"] == 2
