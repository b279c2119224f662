"""Kill -9 at random points (inside steps and inside checkpoint writes), resume from `latest` each time: the final
weights and the logged loss sequence equal an uninterrupted run's bitwise.

FLOWTRAIN_KILL_POINTS sets the number of kills (default 5); `benchmarks/kill_resume.py` runs many more.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from flowtrain.testing import killharness as kh
from flowtrain.train.checkpoint import list_checkpoints, verify_checkpoint


def test_sigkill_anywhere_then_resume_equals_uninterrupted(reference_run, tmp_path):
    kills = kh.kill_points(default=5)
    out = tmp_path / "killed"
    res = kh.kill_and_resume(reference_run.config, out, reference_run.max_steps, kills=kills, seed=1234)
    log = (tmp_path / "killed.log").read_text(errors="replace")
    assert res.final_returncode == 0, log[-4000:]
    assert len(res.kills) == kills
    assert all(k.returncode == -9 for k in res.kills), [(k.phase, k.returncode, k.log_tail) for k in res.kills]
    # The kills landed where they were aimed: some in the middle of a checkpoint write, some in a step.
    assert any(k.in_write for k in res.kills), res.kills
    assert any(k.phase == "step" and not k.in_write for k in res.kills), res.kills
    for k in res.kills:
        if k.in_write:  # the half-written checkpoint is the one after `latest`: it was never taken as `latest`
            assert k.write_step == k.latest_after + 1, k
        assert k.latest_after >= k.latest_before  # and no complete checkpoint was lost

    ref = reference_run.wait()
    # Loss sequence: every step logged exactly once, with the same loss / lr / grad norm to the last bit.
    got, want = kh.loss_sequence(out), kh.loss_sequence(ref)
    assert [s for s, *_ in got] == list(range(1, reference_run.max_steps + 1))
    assert got == want
    # Final weights: the last checkpoint and the exported LoRA file.
    a, b = kh.final_weights(out), kh.final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = load_file(str(out / "pytorch_lora_weights.safetensors"))
    lb = load_file(str(ref / "pytorch_lora_weights.safetensors"))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    # ...and the resumed process really trained on (a resumed LoRA silently equal to the one it loaded is the
    # failure this guards against): its last two checkpoints differ, and LoRA B (zero at init) moved.
    before = load_file(str(out / f"checkpoint-{reference_run.max_steps - 1}" / "trainable.safetensors"))
    assert any(not torch.equal(before[k], a[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)

    # The run folder is clean: complete checkpoints only (keep_last=2), every one intact, no leftovers.
    assert [s for s, _ in list_checkpoints(out)] == [reference_run.max_steps - 1, reference_run.max_steps]
    assert all(verify_checkpoint(p) is None for _, p in list_checkpoints(out))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
