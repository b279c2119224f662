"""A pipeline (`stages:`) killed with SIGKILL inside a stage's checkpoint write, right after a stage's last
checkpoint (before pipeline.json records it), right as the next stage starts, and inside a step of a stage that
ends on a plateau, resumed with `latest` each time: every stage's logged losses and final weights equal an
uninterrupted pipeline's bitwise, and each stage ends at the same step for the same reason."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowtrain.testing import killharness as kh
from flowtrain.testing.data import tiny_config_dict

STAGES = [
    {"name": "warm", "steps": 4},
    # ends on a constructed plateau (no improvement can beat min_delta 1e9) at step 1 + 3; keeps warm's optimizer
    {"name": "main", "steps": 6, "optimizer_state": "keep", "overrides": {"train": {"learning_rate": 5e-4}},
     "end": {"patience": 3, "min_delta": 1e9, "smoothing": 0.5}},
]  # fmt: skip


def _record(out):
    stages = json.loads((out / "pipeline.json").read_text())["stages"]
    return {name: (e["status"], e["step"], e["ended"]) for name, e in stages.items()}


def _write_config(path, pipeline, cache, stages=STAGES):
    """The tiny LoRA run with every random draw of a step on (as the single-run kill test), as a pipeline."""
    d = tiny_config_dict(pipeline, cache, path.parent / "unused")
    d["lora"]["dropout"] = 0.1
    d["train"].update(caption_dropout=0.2, log_every=1)
    d["dataset"]["latent_sampling"] = "sample"
    d["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    d["stages"] = stages
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.slow
def test_pipeline_killed_anywhere_resumes_exactly(tmp_path, tiny_pipeline_dir, tiny_cache):
    cfg = _write_config(tmp_path / "cfg.yaml", tiny_pipeline_dir, tiny_cache[1])
    ref = tmp_path / "ref"
    with open(tmp_path / "ref.log", "wb") as fh:
        rc = subprocess.run(kh.train_command(cfg, ref, resume=False), env=kh.child_env(), stdout=fh,
                            stderr=subprocess.STDOUT, timeout=600).returncode  # fmt: skip
    assert rc == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert _record(ref) == {"warm": ("done", 4, "length"), "main": ("done", 4, "plateau")}

    out = tmp_path / "killed"
    kills = [
        kh.StageKill("write", "warm", 2),  # inside warm's checkpoint-2 write
        kh.StageKill("final", "warm", 4),  # warm's last checkpoint is complete, pipeline.json not yet written
        kh.StageKill("next", "warm"),  # warm recorded: main is being built
        kh.StageKill("step", "main", 2),  # inside main's step 3 (its plateau state is restored from checkpoint-2)
    ]
    res = kh.kill_pipeline_and_resume(cfg, out, kills, seed=7)
    log = (tmp_path / "killed.log").read_text(errors="replace")
    assert res.final_returncode == 0, log[-4000:]
    assert all(k.hit and k.returncode == -9 for k in res.kills), [(k, k.log_tail) for k in res.kills]
    assert not res.kills[0].recorded and not res.kills[3].recorded and res.kills[2].recorded

    assert _record(out) == _record(ref)
    for stage in ("warm", "main"):
        a, b = out / "stages" / stage, ref / "stages" / stage
        assert kh.loss_sequence(a) == kh.loss_sequence(b), stage  # every step once, to the last bit
        wa, wb = kh.final_weights(a), kh.final_weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), stage
        la, lb = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (a, b))
        assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la), stage
    # main trained on from warm (its weights moved) and logged its smoothed loss
    assert any(not torch.equal(kh.final_weights(out / "stages" / "warm")[k], v)
               for k, v in kh.final_weights(out / "stages" / "main").items())  # fmt: skip
    rows = [json.loads(x) for x in (out / "stages" / "main" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("loss_smoothed" in r for r in rows)


# LoRA → full (the LoRA merged into the base) → LoRA (a fresh adapter on the full weights): what is trained changes
# twice, so each transition bakes the earlier stages into the base.
TRANSITIONS = [
    {"name": "adapt", "steps": 3},
    {"name": "all", "steps": 3, "overrides": {"train_mode": "full", "train": {"learning_rate": 1e-4}}},
    {"name": "again", "steps": 3},
]


@pytest.mark.slow
def test_pipeline_killed_at_train_mode_transitions_resumes_exactly(tmp_path, tiny_pipeline_dir, tiny_cache):
    cfg = _write_config(tmp_path / "cfg.yaml", tiny_pipeline_dir, tiny_cache[1], TRANSITIONS)
    ref = tmp_path / "ref"
    with open(tmp_path / "ref.log", "wb") as fh:
        rc = subprocess.run(kh.train_command(cfg, ref, resume=False), env=kh.child_env(), stdout=fh,
                            stderr=subprocess.STDOUT, timeout=600).returncode  # fmt: skip
    assert rc == 0, (tmp_path / "ref.log").read_text()[-3000:]
    out = tmp_path / "killed"
    kills = [
        kh.StageKill("next", "adapt"),  # adapt recorded: `all` is merging its LoRA into the base
        kh.StageKill("step", "all", 1),  # inside `all`'s step 2 (resumed: the base baked again, then checkpoint-1)
        kh.StageKill("next", "all"),  # `all` recorded: `again` is putting a new adapter on its weights
        kh.StageKill("step", "again", 1),
    ]
    res = kh.kill_pipeline_and_resume(cfg, out, kills, seed=3)
    log = (tmp_path / "killed.log").read_text(errors="replace")
    assert res.final_returncode == 0, log[-4000:]
    assert all(k.hit and k.returncode == -9 for k in res.kills), [(k, k.log_tail) for k in res.kills]
    assert _record(out) == _record(ref) == {s["name"]: ("done", 3, "length") for s in TRANSITIONS}
    for stage in ("adapt", "all", "again"):
        a, b = out / "stages" / stage, ref / "stages" / stage
        assert kh.loss_sequence(a) == kh.loss_sequence(b), stage
        wa, wb = kh.final_weights(a), kh.final_weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), stage
    assert all(".lora_" not in k for k in kh.final_weights(out / "stages" / "all"))  # `all` trained every weight
    entry = json.loads((out / "pipeline.json").read_text())["stages"]["again"]
    assert entry["lora_base"] == {
        "stages": ["adapt", "all"],
        "transformer": str(out / "stages" / "all" / "transformer"),
    }
