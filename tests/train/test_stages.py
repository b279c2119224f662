"""Training pipelines (`stages:`): the end conditions by hand, the plan, and pipelines of the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flowtrain.config import FlowtrainConfig
from flowtrain.config.stages import StageEndConfig, plan_lines, stage_configs
from flowtrain.testing.data import tiny_config_dict
from flowtrain.train.stages import (
    StageEnd,
    apply_freeze,
    below,
    plateau_update,
    run_pipeline,
    smoothed,
    steps_for_epochs,
)

# ---------------------------------------------------------------------------------------------------------------
# End conditions, against hand computations.


def test_smoothed_is_a_bias_corrected_ema():
    acc, n, v = smoothed(0.0, 0, 2.0, 0.5)
    assert (acc, n, v) == (1.0, 1, 2.0)  # 0.5·0 + 0.5·2 = 1, / (1 - 0.5) = 2: the first value is the loss
    acc, n, v = smoothed(acc, n, 4.0, 0.5)
    assert (acc, n) == (2.5, 2) and v == pytest.approx(2.5 / 0.75)  # (0.5·1 + 0.5·4) / (1 - 0.25)
    assert smoothed(7.0, 3, 1.5, 0.0)[2] == 1.5  # β = 0: the loss as is


def test_threshold_and_plateau_by_hand():
    assert below(0.29, 0.3) and not below(0.3, 0.3) and not below(-1.0, None)
    # improvements must exceed min_delta; the stop comes `patience` steps after the last one
    best, at, stop = plateau_update(None, 0, 1.0, 10, 20, 0.1)
    assert (best, at, stop) == (1.0, 10, False)
    assert plateau_update(best, at, 0.95, 20, 20, 0.1) == (1.0, 10, False)  # 0.05 is no improvement
    assert plateau_update(best, at, 0.95, 30, 20, 0.1) == (1.0, 10, True)  # 20 steps since step 10
    assert plateau_update(best, at, 0.85, 30, 20, 0.1) == (0.85, 30, False)  # improved: the clock restarts
    assert plateau_update(best, at, 0.95, 10_000, None, 0.1)[2] is False  # no patience: never


def test_stage_end_switches_at_the_right_step_on_a_constructed_loss():
    """Losses 1.0, 0.8, ..., logged every 10 steps; β 0.5. Smoothed (bias-corrected) by hand:
    step 10: 1.0; 20: (0.25+0.4)/0.75 = 0.8667; 30: (0.325+0.3)/0.875 = 0.7143; 40: (0.3125+0.2)/0.9375 = 0.5467.
    loss_below 0.6 fires at step 40, not at step 30 where the raw loss (0.6) already touched it."""
    end = StageEnd(StageEndConfig(loss_below=0.6, smoothing=0.5))
    fired = [end.observe(step, loss) for step, loss in [(10, 1.0), (20, 0.8), (30, 0.6), (40, 0.4)]]
    assert fired == [False, False, False, True] and end.reason == "loss_below"
    assert end.value == pytest.approx(0.5125 / 0.9375)
    # min_steps holds it back
    late = StageEnd(StageEndConfig(loss_below=10.0, smoothing=0.0, min_steps=25))
    assert [late.observe(s, 1.0) for s in (10, 20, 30)] == [False, False, True]


def test_early_stop_fires_on_a_constructed_plateau():
    """The loss falls to 0.5 at step 30, then stays within ±0.01: with patience 40 the stage stops at step 70."""
    end = StageEnd(StageEndConfig(patience=40, min_delta=0.02, smoothing=0.0))
    losses = [1.0, 0.7, 0.5, 0.51, 0.49, 0.5, 0.495, 0.5]
    fired = [end.observe(10 * (i + 1), v) for i, v in enumerate(losses)]
    assert fired.index(True) == 6 and end.reason == "plateau" and end.best_step == 30
    # NaN (a log window of skipped steps) is ignored, and the state round-trips (it rides in checkpoints)
    other = StageEnd(StageEndConfig(patience=40, min_delta=0.02, smoothing=0.0))
    other.load_state_dict(json.loads(json.dumps(end.state_dict())))
    assert other.ended and other.state_dict() == end.state_dict()
    assert StageEnd(StageEndConfig(patience=1)).observe(5, float("nan")) is False


def test_steps_for_epochs():
    assert steps_for_epochs(1, 8, 2, 1, 1) == 4
    assert steps_for_epochs(2.5, 9, 2, 1, 1) == 10  # 4 full batches an epoch (the ragged one is dropped)
    assert steps_for_epochs(1, 8, 2, 1, 3) == 2  # 4 batches / 3 per step, rounded up
    with pytest.raises(ValueError, match="no batch"):
        steps_for_epochs(1, 3, 2, 2, 1)


def test_freeze_and_unfreeze_patterns():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    frozen = apply_freeze(model, ["0", r"1\.bias"], ["0.bias"])
    assert frozen == ["0.weight", "1.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.bias", "1.weight"]
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        apply_freeze(torch.nn.Linear(2, 2), ["proj_out"], [])
    with pytest.raises(ValueError, match="every trainable parameter"):
        apply_freeze(torch.nn.Linear(2, 2), [".*"], [])


# ---------------------------------------------------------------------------------------------------------------
# The config and the plan.


def _pipeline_dict(tmp_path, stages, **base):
    d = tiny_config_dict(tmp_path / "pipe", tmp_path / "cache", tmp_path / "run")
    d["stages"] = stages
    d.update(base)
    return d


def test_stage_overrides_merge_into_the_base(tmp_path):
    cfg = FlowtrainConfig.model_validate(
        _pipeline_dict(
            tmp_path,
            [
                {"name": "warm", "steps": 3, "overrides": {"train": {"learning_rate": 0.5}, "loss": {"base": "l1"}}},
                {
                    "name": "main",
                    "epochs": 2,
                    "optimizer_state": "keep",
                    "overrides": {"lr_scheduler": {"name": "cosine"}},
                },
            ],
        )
    )
    warm, main = stage_configs(cfg)
    assert (warm.train.max_steps, warm.train.learning_rate, warm.loss.base) == (3, 0.5, "l1")
    assert (main.train.learning_rate, main.loss.base, main.lr_scheduler.name) == (1e-3, "mse", "cosine")
    assert main.train.batch_size == 2 and main.lora.rank == 4  # untouched sections stay the base's
    assert warm.output_dir == f"{tmp_path / 'run'}/stages/warm" and warm.checkpoint.final and not warm.stages
    text = "\n".join(plan_lines(cfg))
    assert "1. warm: trains the transformer, LoRA rank 4" in text and "ends after 3 steps" in text
    assert "2 epochs of" in text and "state kept from the previous stage" in text


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a", "overrides": {"train": {"learning_rat": 1}}}], r"stages\[0\] \('a'\).*learning_rat"),
        ([{"name": "a"}, {"name": "a"}], "unique"),
        ([{"name": "a", "optimizer_state": "keep"}], "needs a previous transformer stage"),
        (
            [{"name": "a"}, {"name": "b", "optimizer_state": "keep", "overrides": {"train_mode": "full"}}],
            "the trained tensors change",
        ),
        ([{"name": "a"}, {"name": "b", "optimizer_state": "keep", "freeze": ["x"]}], "freeze / unfreeze differ"),
        ([{"name": "a", "steps": 2, "epochs": 1}], "steps or epochs, not both"),
        ([{"name": "a", "overrides": {"output_dir": "x"}}], "the pipeline sets it"),
        ([{"name": "a b"}], "names a folder"),
        ([{"name": "a", "kind": "autoencoder"}], "needs `autoencoder:`"),
        ([{"name": "a", "kind": "autoencoder", "autoencoder": "x.yaml", "freeze": ["x"]}], "options of transformer"),
        ([{"name": "a", "autoencoder": "x.yaml"}], "need kind: autoencoder"),
        ([{"name": "a", "kind": "autoencoder", "autoencoder": "/nonexistent.yaml"}], r"stages\[0\] \('a'\): auto"),
        ([{"name": "a", "freeze": ["("]}], "not a valid regex"),
    ],
)
def test_bad_pipelines_are_refused_with_the_stage_named(tmp_path, stages, message):
    with pytest.raises(ValueError, match=message):
        FlowtrainConfig.model_validate(_pipeline_dict(tmp_path, stages))


# ---------------------------------------------------------------------------------------------------------------
# Pipelines of the tiny model.


def _cfg(pipeline, cache, out, stages, **sections):
    d = tiny_config_dict(pipeline, cache, out)
    d["train"].update(log_every=1, learning_rate=3e-2)  # a loss that falls within a few steps
    d["checkpoint"] = {"every_steps": 2, "keep_last": None}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    d["stages"] = stages
    return FlowtrainConfig.model_validate(d)


def _rows(stage_dir):
    return [json.loads(x) for x in (stage_dir / "logs" / "metrics.jsonl").read_text().splitlines() if x]


def test_pipeline_switches_on_a_loss_threshold_carries_weights_and_stops_early(tiny_pipeline_dir, tiny_cache, tmp_path):
    """Stage `warm` (up to 8 steps) ends when its smoothed loss falls below a threshold set between two of its
    smoothed values, so the step it must end at is known; stage `main` freezes the single-stream blocks' adapters
    and stops on a constructed plateau (no improvement can exceed min_delta 1e9, so it stops `patience` steps
    after its first logged step); stage `tail` keeps main's optimizer state with its own learning rate."""
    cache = tiny_cache[1]
    # The reference: warm's losses without an end condition, smoothed by the stage's rule.
    ref = run_pipeline(_cfg(tiny_pipeline_dir, cache, tmp_path / "ref", [{"name": "warm", "steps": 8}]), progress=False)
    acc = n = 0
    values = []
    for step in range(1, 9):
        acc, n, v = smoothed(acc, n, ref.losses[step], 0.5)
        values.append(v)
    # the last step after min_steps 2 whose smoothed loss is a new low, below every earlier one
    lows = [s for s in range(3, 9) if values[s - 1] < min(values[: s - 1])]
    assert lows, values  # the tiny run's loss does fall
    end_at = lows[-1]
    threshold = (values[end_at - 1] + min(values[: end_at - 1])) / 2
    stages = [
        {"name": "warm", "steps": 8, "end": {"loss_below": threshold, "smoothing": 0.5, "min_steps": 2}},
        {"name": "main", "steps": 10, "freeze": ["single_transformer_blocks"],
         "end": {"patience": 3, "min_delta": 1e9, "smoothing": 0.0}},
        {"name": "tail", "steps": 5, "optimizer_state": "keep", "freeze": ["single_transformer_blocks"],
         "overrides": {"train": {"learning_rate": 1e-3},
                       "validation": {"every_steps": 5, "prompts": ["a photo"], "num_inference_steps": 1}}},
    ]  # fmt: skip
    res = run_pipeline(_cfg(tiny_pipeline_dir, cache, tmp_path / "run", stages), progress=False)
    run = tmp_path / "run"
    assert res.stages["warm"]["step"] == end_at and res.stages["warm"]["ended"] == "loss_below"
    assert res.stages["main"]["step"] == 4 and res.stages["main"]["ended"] == "plateau"  # 1 + patience 3
    assert json.loads((run / "pipeline.json").read_text())["stages"]["main"]["ended"] == "plateau"
    # warm trained exactly like the reference up to its end (the end condition changes nothing before it)
    warm_rows = _rows(run / "stages" / "warm")
    assert [r["step"] for r in warm_rows] == list(range(1, end_at + 1))
    assert [r["loss"] for r in warm_rows] == [ref.losses[s] for s in range(1, end_at + 1)]
    assert warm_rows[-1]["loss_smoothed"] == pytest.approx(values[end_at - 1])
    # each stage keeps its own record, ending with a final checkpoint
    assert (run / "stages" / "main" / "logs" / "metrics.jsonl").exists()
    assert (run / "stages" / "warm" / f"checkpoint-{end_at}").is_dir()

    # Weights carry over: main's frozen adapters are warm's final ones; its trained ones moved on from them.
    warm_final = load_file(str(run / "stages" / "warm" / f"checkpoint-{end_at}" / "trainable.safetensors"))
    main_final = load_file(str(run / "stages" / "main" / "checkpoint-4" / "trainable.safetensors"))
    assert main_final.keys() == {k for k in warm_final if not k.startswith("single_transformer_blocks")}
    assert all(not torch.equal(main_final[k], warm_final[k]) for k in main_final if "lora_B" in k)
    exported = load_file(str(run / "stages" / "main" / "pytorch_lora_weights.safetensors"))
    frozen_b = [k for k in warm_final if k.startswith("single_transformer_blocks") and "lora_B" in k]
    assert frozen_b
    for k in frozen_b:  # the exported LoRA (diffusers keys) holds the carried, frozen tensors unchanged
        match = [v for ek, v in exported.items() if ek.endswith(k.replace(".default", ""))]
        assert len(match) == 1 and torch.equal(match[0], warm_final[k]), k
    # optimizer_state keep: tail's step counts go on from main's (reset: main's started at 0)
    for stage, last, want in (("main", 4, 4), ("tail", 5, 9)):
        opt = torch.load(run / "stages" / stage / f"checkpoint-{last}" / "optimizer.pt", weights_only=False)
        assert {float(s["step"]) for s in opt["state"].values()} == {float(want)}, stage
    assert [r["lr"] for r in _rows(run / "stages" / "tail")] == [1e-3] * 5  # ...with its own learning rate
    assert res.stages["tail"] == {"status": "done", "step": 5, "ended": "length",
                                  "checkpoint": str(run / "stages" / "tail" / "checkpoint-5")}  # fmt: skip
    # Validation images carry the stage, the epoch (8 rows / batch 2: step 5 is in epoch 1) and the step.
    samples = sorted(p.name for p in (run / "stages" / "tail" / "samples").glob("*.png"))
    assert samples == ["tail_epoch001_step000005_00_0.png", "tail_epoch001_step000005_grid.png"]
    assert _rows(run / "stages" / "tail")[-1]["epoch"] == 1


def test_check_prints_the_plan_as_comments(tmp_path, capsys):
    import yaml

    from flowtrain.cli import main

    d = _pipeline_dict(
        tmp_path,
        [
            {"name": "warm", "steps": 5, "freeze": ["single_transformer_blocks"], "unfreeze": ["proj_out"],
             "end": {"loss_below": 0.4, "min_steps": 2}},
            {"name": "main", "overrides": {"train": {"max_steps": 7}}, "end": {"patience": 3, "min_delta": 0.01}},
        ],
    )  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d))
    assert main(["check", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    plan = [line for line in out.splitlines() if line.startswith("# ")]
    assert plan[0] == f"# pipeline: 2 stages in {tmp_path / 'run'}/stages/"
    assert "# 1. warm: trains the transformer, LoRA rank 4 (lora) on attention" in plan
    assert "#    freezes ['single_transformer_blocks'] except ['proj_out']" in plan
    assert "#    ends after 5 steps, or when the smoothed loss (β 0.9) < 0.4 from step 2" in plan
    assert "#    ends after 7 steps, or on a plateau: no improvement > 0.01 for 3 steps (early stop)" in plan
    assert [s["name"] for s in yaml.safe_load(out)["stages"]] == ["warm", "main"]  # still a config


def test_autoencoder_stage_runs_once_and_resumes_when_cut_short(tiny_pipeline_dir, tiny_cache, tmp_path):
    """kind autoencoder trains the family's VAE in its stage folder (the demo's autoencoder config on the tiny
    images); a finished pipeline resumed redoes nothing; an autoencoder stage that was cut short (not in
    pipeline.json) continues from its newest checkpoint, to the same weights."""
    from pathlib import Path

    ae_yaml = Path(__file__).parents[2] / "configs" / "demo" / "autoencoder.yaml"
    over = [f"data.raw_dir={tiny_cache[0]}", "data.resolution=32", "train.batch_size=4", "train.log_every=1",
            "tracking.report_to=[jsonl]", "lr_scheduler.warmup_steps=0", "checkpointing.every_steps=1"]  # fmt: skip
    stages = [
        {"name": "vae", "kind": "autoencoder", "autoencoder": str(ae_yaml), "steps": 3, "autoencoder_overrides": over},
        {"name": "dit", "steps": 2},
    ]
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", stages)
    assert "1. vae: trains the autoencoder" in "\n".join(plan_lines(cfg))
    res = run_pipeline(cfg, progress=False)
    vae = tmp_path / "run" / "stages" / "vae" / "vae"
    assert res.stages["vae"]["step"] == 3 and res.stages["vae"]["vae"] == str(vae)
    assert [r["step"] for r in _rows(vae.parent)] == [1, 2, 3, 3]  # 3 steps, then the fitted stats' row
    assert res.stages["dit"]["step"] == 2
    weights = next(vae.glob("*.safetensors"))
    first, stamp = load_file(str(weights)), weights.stat().st_mtime_ns

    again = run_pipeline(cfg, resume="latest", progress=False)
    assert again.stages == res.stages and weights.stat().st_mtime_ns == stamp  # nothing redone

    record = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    del record["stages"]["vae"]  # as if killed inside the autoencoder stage, after its checkpoint at step 2
    (tmp_path / "run" / "pipeline.json").write_text(json.dumps(record))
    shutil.rmtree(vae)
    assert (vae.parent / "checkpoint-2").is_dir() and not (vae.parent / "checkpoint-3").exists()  # none at the end
    saved = (vae.parent / "checkpoint-2").stat().st_mtime_ns
    run_pipeline(cfg, resume="latest", progress=False)
    assert (vae.parent / "checkpoint-2").stat().st_mtime_ns == saved  # continued from it, not trained again
    second = load_file(str(weights))
    assert all(torch.equal(first[k], second[k]) for k in first)  # step 3 again from checkpoint-2: the same VAE
    rows = _rows(vae.parent)
    assert [r["step"] for r in rows] == [1, 2, 3, 3]  # the log continued: step 3 once, then the stats' row


def test_autoencoder_stage_starts_from_an_earlier_ones_vae(tiny_pipeline_dir, tiny_cache, tmp_path):
    """autoencoder_from: the second autoencoder stage starts from the first one's trained VAE (model.pretrained is
    that stage's folder): with a vanishing learning rate it ends where the first ended; naming a stage that is not
    an earlier autoencoder stage is refused when the config is read."""
    from pathlib import Path

    from flowtrain.config.stages import stage_configs

    ae_yaml = Path(__file__).parents[2] / "configs" / "demo" / "autoencoder.yaml"
    over = [f"data.raw_dir={tiny_cache[0]}", "data.resolution=32", "train.batch_size=4", "train.log_every=1",
            "tracking.report_to=[jsonl]", "lr_scheduler.warmup_steps=0"]  # fmt: skip
    stages = [
        {"name": "a", "kind": "autoencoder", "autoencoder": str(ae_yaml), "steps": 3, "autoencoder_overrides": over},
        {
            "name": "b",
            "kind": "autoencoder",
            "autoencoder": str(ae_yaml),
            "steps": 1,
            "autoencoder_from": "a",
            "autoencoder_overrides": [*over, "train.learning_rate=1e-20"],
        },  # fmt: skip
    ]
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", stages)
    assert stage_configs(cfg)[1].model.pretrained == f"{tmp_path / 'run'}/stages/a"
    run_pipeline(cfg, progress=False)
    a, b = (load_file(str(next((tmp_path / "run" / "stages" / n / "vae").glob("*.safetensors")))) for n in "ab")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match=r"autoencoder_from 'c' is not an earlier autoencoder stage"):
        _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "x", [stages[0], {**stages[1], "autoencoder_from": "c"}])


def test_stage_runs_nest_under_the_pipelines_mlflow_run_and_epochs_set_a_length(
    tiny_pipeline_dir, tiny_cache, tmp_path
):
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    ae_yaml = Path(__file__).parents[2] / "configs" / "demo" / "autoencoder.yaml"
    ae_over = [f"data.raw_dir={tiny_cache[0]}", "data.resolution=32", "train.batch_size=4", "train.log_every=1",
               "tracking.report_to=[mlflow,jsonl]", "tracking.mlflow_async=false"]  # fmt: skip
    stages = [
        {
            "name": "vae",
            "kind": "autoencoder",
            "autoencoder": str(ae_yaml),
            "steps": 1,
            "autoencoder_overrides": ae_over,
        },
        {"name": "one", "steps": 1},
        {"name": "two", "epochs": 0.5},  # 8 rows, batch 2: half an epoch = 2 steps
    ]
    tracking = {"report_to": ["mlflow", "jsonl"], "mlflow_async": False, "log_weights": False}
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", stages, tracking=tracking)
    res = run_pipeline(cfg, progress=False)
    assert (res.stages["one"]["step"], res.stages["two"]["step"]) == (1, 2)
    parent = json.loads((tmp_path / "run" / "pipeline.json").read_text())["mlflow_parent"]
    assert parent["uri"] == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=parent["uri"])
    runs = client.search_runs(client.get_experiment_by_name("flowtrain").experiment_id)
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"run", "vae", "one", "two"}
    assert by_name["run"].info.run_id == parent["run_id"] and by_name["run"].info.status == "FINISHED"
    for name in ("vae", "one", "two"):  # the autoencoder stage's run too
        assert by_name[name].data.tags["mlflow.parentRunId"] == parent["run_id"]
        assert "loss" in by_name[name].data.metrics
