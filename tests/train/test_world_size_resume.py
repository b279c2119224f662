"""Resuming on another process count, the parts that need no processes: the open log window and the data
position (the multi-process runs are in tests/dist/test_ddp_cpu.py)."""

from __future__ import annotations

import json

import pytest

from flowtrain.train.checkpoint import _loop_state
from flowtrain.train.resume import resume_position
from flowtrain.train.state import DataPosition, TrainState


def test_the_log_window_carries_over_as_the_mean_of_the_saved_processes(tmp_path):
    for rank, acc in enumerate([1.5, 2.5]):
        (tmp_path / f"loop-rank{rank}.json").write_text(json.dumps({"loss_acc": acc, "steps_acc": 2}))
    # the same count: each process its own part, as before
    assert _loop_state(tmp_path, 1, 2, 2) == {"loss_acc": 2.5, "steps_acc": 2}
    assert _loop_state(tmp_path, 1, None, 2) == {"loss_acc": 2.5, "steps_acc": 2}
    # another count: every process the mean, so the process-averaged logged loss is unchanged
    for rank, world in ((0, 1), (0, 4), (3, 4)):
        assert _loop_state(tmp_path, rank, world, 2) == {"loss_acc": 2.0, "steps_acc": 2}
    assert _loop_state(tmp_path / "missing", 0, 2, 1) is None


# (old global batch, new global batch, (epoch, batch, seed) to go on from); 2 → 4 repeats 2 samples, skips none
POSITIONS = [(4, 4, (1, 1, 7)), (4, 2, (1, 2, 7)), (2, 4, (1, 0, 7))]


@pytest.mark.parametrize(("old_global", "new_global", "want"), POSITIONS)
def test_the_data_position_is_kept_in_samples(old_global, new_global, want):
    state = TrainState(step=5, data=DataPosition(epoch=1, batch=1, seed=7), essentials={}, learning_rate=1e-3,
                       max_steps=9, world_size=1, global_batch=old_global)  # fmt: skip
    # 8 rows; old position: epoch 1, sample 1·old_global
    assert resume_position(state, new_global, 8) == want
