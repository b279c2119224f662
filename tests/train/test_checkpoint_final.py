"""`checkpoint.final: false`: the run ends with its exported weights and no checkpoint of the last step."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from flowtrain.config import FlowtrainConfig
from flowtrain.testing.data import tiny_config_dict
from flowtrain.train.checkpoint import list_checkpoints
from flowtrain.train.loop import train

LORA = "pytorch_lora_weights.safetensors"


def test_no_final_checkpoint_but_the_export_and_an_exact_resume(tiny_pipeline_dir, tiny_cache, tmp_path):
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", max_steps=4)
    d["checkpoint"] = {"every_steps": 2, "keep_last": None, "final": False}
    cfg = FlowtrainConfig.model_validate(d)
    result = train(cfg, progress=False)
    out = result.output_dir
    assert [step for step, _ in list_checkpoints(out)] == [2]  # every_steps still saves; step 4 does not
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    exported = load_file(out / LORA)

    # Nothing is lost for good: resuming from the last periodic checkpoint retrains steps 3-4 to the same weights.
    (out / LORA).unlink()
    train(cfg, resume="latest", progress=False)
    again = load_file(out / LORA)
    assert exported.keys() == again.keys()
    assert all(exported[k].equal(again[k]) for k in exported)
    assert [step for step, _ in list_checkpoints(out)] == [2]


def test_final_checkpoint_is_written_by_default(tiny_pipeline_dir, tiny_cache, tmp_path):
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", max_steps=3)
    d["checkpoint"] = {"every_steps": None}
    assert FlowtrainConfig.model_validate(d).checkpoint.final is True
    result = train(FlowtrainConfig.model_validate(d), progress=False)
    assert [step for step, _ in list_checkpoints(result.output_dir)] == [3]
