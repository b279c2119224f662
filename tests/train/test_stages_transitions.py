"""Pipeline stages that change what they train (train_mode LoRA ↔ full, another LoRA shape): the next stage starts
from exactly the base with the earlier stages baked in (checked against a hand merge W + α/r·B·A), a LoRA trained
on such a base names it for sampling, and a pipeline cut at the transition resumes to the same bits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flowtrain.config import FlowtrainConfig
from flowtrain.config.stages import plan_lines
from flowtrain.models import get_family
from flowtrain.testing import killharness as kh
from flowtrain.testing.data import tiny_config_dict
from flowtrain.train.stages import StageContext, run_pipeline, sampling_base

FULL = {"train_mode": "full", "train": {"learning_rate": 1e-3}}


def _cfg(pipeline, cache, out, stages):
    d = tiny_config_dict(pipeline, cache, out)
    d["train"].update(log_every=1, learning_rate=3e-2)
    d["checkpoint"] = {"every_steps": 1, "keep_last": None}
    d["stages"] = stages
    return FlowtrainConfig.model_validate(d)


@pytest.fixture
def starts(monkeypatch):
    """Each stage's transformer state dict as its optimizer is built (after carry-over, baking and freezing):
    what the stage starts from. An observer around the real `prepare_model`."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = StageContext.prepare_model

    def observe(self, model):
        real(self, model)
        seen[self.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(StageContext, "prepare_model", observe)
    return seen


def _base(cfg) -> dict[str, torch.Tensor]:
    """The pretrained transformer's weights in fp32."""
    model = get_family(cfg.model.family).load_transformer(cfg.model, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hand_merge(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float) -> dict:
    """W + scale·(B @ A) for every adapted Linear (`{module}.lora_A.default.weight` [r, in], `lora_B` [out, r])."""
    out = dict(base)
    modules = {k[: -len(".lora_A.default.weight")] for k in lora if k.endswith(".lora_A.default.weight")}
    assert modules
    for m in modules:
        delta = (lora[f"{m}.lora_B.default.weight"] @ lora[f"{m}.lora_A.default.weight"]) * scale
        out[f"{m}.weight"] = base[f"{m}.weight"] + delta
    return out, modules


def _base_of_lora_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights of a peft-wrapped state dict, under the plain model's names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def test_lora_then_full_starts_from_base_plus_merged_lora(tiny_pipeline_dir, tiny_cache, tmp_path, starts):
    stages = [{"name": "adapt", "steps": 2}, {"name": "all", "steps": 2, "overrides": FULL}]
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", stages)
    plan = "\n".join(plan_lines(cfg))
    assert "2. all: trains the transformer, all weights" in plan
    assert "carries over from adapt: the base with its LoRA merged in (peft's merge, in fp32)" in plan
    res = run_pipeline(cfg, progress=False)
    assert (res.stages["adapt"]["step"], res.stages["all"]["step"]) == (2, 2)

    lora = load_file(str(tmp_path / "run" / "stages" / "adapt" / "checkpoint-2" / "trainable.safetensors"))
    base = _base(cfg)
    want, modules = _hand_merge(base, lora, cfg.lora.effective_alpha / cfg.lora.rank)
    got = starts["all"]
    assert got.keys() == base.keys()  # a plain model again: no adapter layers left
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert all(not torch.equal(got[f"{m}.weight"], base[f"{m}.weight"]) for m in modules)  # the LoRA moved them
    # the full stage trained every weight from there
    final = kh.final_weights(tmp_path / "run" / "stages" / "all")
    assert final.keys() == base.keys()
    assert not any("lora_base" in e for e in res.stages.values())  # a full stage's export is whole weights


def test_full_then_lora_trains_on_the_full_weights_and_names_that_base(
    tiny_pipeline_dir, tiny_cache, tmp_path, starts, capsys
):
    stages = [{"name": "all", "steps": 2, "overrides": FULL}, {"name": "adapt", "steps": 2}]
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", stages)
    assert "carries over from all: its full weights, as the frozen base (float32) of a new LoRA" in "\n".join(
        plan_lines(cfg)
    )
    res = run_pipeline(cfg, progress=False)
    run = tmp_path / "run" / "stages"
    full = load_file(str(run / "all" / "checkpoint-2" / "trainable.safetensors"))
    got = _base_of_lora_model(starts["adapt"])
    assert got.keys() == full.keys() and all(torch.equal(got[k], full[k]) for k in full)
    # a fresh adapter: B starts at zero, and the stage trained only the adapter
    assert all(not v.any() for k, v in starts["adapt"].items() if "lora_B" in k)
    assert all(".lora_" in k for k in kh.final_weights(run / "adapt"))
    # pipeline.json names the base its LoRA is relative to; sampling the LoRA finds it
    entry = json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"]["adapt"]
    assert entry["lora_base"] == {"stages": ["all"], "transformer": str(run / "all" / "transformer")}
    assert res.stages["adapt"]["lora_base"] == entry["lora_base"]
    lora_file = run / "adapt" / "pytorch_lora_weights.safetensors"
    assert sampling_base(lora_file) == run / "all" / "transformer"
    assert sampling_base(run / "all" / "transformer") is None  # a full stage: no base to name
    # `flowtrain sample --lora` of that stage samples on that base: the images of --transformer base + the LoRA
    from flowtrain.cli import main
    from flowtrain.sample import generate, load_sampling_pipeline

    flags = ["--model", str(tiny_pipeline_dir), "--prompt", "a photo", "--steps", "2", "--height", "32", "--width",
             "32", "--device", "cpu"]  # fmt: skip
    assert main(["sample", "--lora", str(lora_file), "--out", str(tmp_path / "s"), *flags]) == 0
    assert f"trained on the base {run / 'all' / 'transformer'}" in capsys.readouterr().out
    pipe = load_sampling_pipeline(cfg.model, lora=str(lora_file), transformer=str(run / "all" / "transformer"),
                                  dtype=torch.float32, device="cpu")  # fmt: skip
    [want] = generate(pipe, ["a photo"], cfg.model, seed=0, steps=2, height=32, width=32)
    got = Image.open(next(p for p in (tmp_path / "s").glob("*.png") if p.name != "grid.png"))
    assert np.array_equal(np.asarray(got), np.asarray(want))
    plain = load_sampling_pipeline(cfg.model, lora=str(lora_file), dtype=torch.float32, device="cpu")
    [wrong] = generate(plain, ["a photo"], cfg.model, seed=0, steps=2, height=32, width=32)
    assert not np.array_equal(np.asarray(got), np.asarray(wrong))  # the pretrained base would give other images
    # the exported LoRA (ComfyUI layout) is the same relative LoRA: export says which base it belongs on
    assert main(["export", str(run / "adapt"), "--format", "comfyui", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert f"relative to the pipeline stage's base {run / 'all' / 'transformer'}" in capsys.readouterr().out
    shutil.rmtree(run / "all" / "transformer")
    with pytest.raises(FileNotFoundError, match="restore that folder"):
        sampling_base(lora_file)


def test_lora_then_another_lora_shape_merges_and_starts_a_fresh_adapter(
    tiny_pipeline_dir, tiny_cache, tmp_path, starts
):
    """LoRA → LoRA of another rank: the first is merged into the base (it cannot load into rank-2 tensors), and
    a fresh rank-2 adapter trains on it; the merged base is written for sampling, equal to what it trained on."""
    stages = [{"name": "r4", "steps": 2}, {"name": "r2", "steps": 2, "overrides": {"lora": {"rank": 2}}}]
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", stages)
    assert "carries over from r4: the base with its LoRA merged in; a new LoRA (LoRA rank 2" in "\n".join(
        plan_lines(cfg)
    )
    run_pipeline(cfg, progress=False)
    run = tmp_path / "run" / "stages"
    lora = load_file(str(run / "r4" / "checkpoint-2" / "trainable.safetensors"))
    want, _ = _hand_merge(_base(cfg), lora, cfg.lora.effective_alpha / cfg.lora.rank)
    got = _base_of_lora_model(starts["r2"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the merge drew from a forked RNG: r2's fresh adapter is initialised as a plain rank-2 run's
    from accelerate.utils import set_seed

    from flowtrain.config.stages import stage_configs
    from flowtrain.train.trainable import apply_lora

    r2cfg = stage_configs(cfg)[1]
    set_seed(r2cfg.train.seed)
    plain = get_family(cfg.model.family).load_transformer(r2cfg.model, dtype=torch.float32)
    apply_lora(plain, r2cfg, get_family(cfg.model.family).lora_presets)
    init = {k: v for k, v in plain.state_dict().items() if ".lora_" in k}
    assert init and all(torch.equal(starts["r2"][k], v) for k, v in init.items())
    r2 = kh.final_weights(run / "r2")
    assert {v.shape[0] for k, v in r2.items() if "lora_A" in k} == {2}
    entry = json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"]["r2"]
    assert entry["lora_base"] == {"stages": ["r4"], "transformer": str(run / "r2" / "base" / "transformer")}
    saved = load_file(str(next((run / "r2" / "base" / "transformer").glob("*.safetensors"))))
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


def test_a_transition_refuses_keeping_the_optimizer_and_a_model_change(tmp_path):
    d = tiny_config_dict(tmp_path / "p", tmp_path / "c", tmp_path / "run")
    d["stages"] = [{"name": "a"}, {"name": "b", "optimizer_state": "keep", "overrides": {"train_mode": "full"}}]
    with pytest.raises(ValueError, match=r"optimizer_state keep, but the trained tensors change"):
        plan_lines(FlowtrainConfig.model_validate(d))
    d["stages"] = [{"name": "a"}, {"name": "b", "overrides": {"model": {"dit": str(tmp_path / "x.safetensors")}}}]
    with pytest.raises(ValueError, match=r"changes the model of stage 'a'"):
        plan_lines(FlowtrainConfig.model_validate(d))


@pytest.mark.parametrize("cut", ["no_checkpoint", "after_step_1"])
def test_a_pipeline_cut_at_a_lora_to_full_transition_resumes_exactly(tiny_pipeline_dir, tiny_cache, tmp_path, cut):
    """The state a kill leaves at the transition (the LoRA stage recorded, the full stage with no checkpoint yet,
    or with its first one), resumed with `latest`: the full stage's losses and weights equal an uninterrupted
    pipeline's bitwise (its base is baked again, to the same bits)."""
    stages = [{"name": "adapt", "steps": 2}, {"name": "all", "steps": 3, "overrides": FULL}]
    ref = tmp_path / "ref"
    run_pipeline(_cfg(tiny_pipeline_dir, tiny_cache[1], ref, stages), progress=False)
    out = tmp_path / "cut"
    cfg = _cfg(tiny_pipeline_dir, tiny_cache[1], out, stages)
    run_pipeline(cfg, progress=False)
    record = json.loads((out / "pipeline.json").read_text())
    del record["stages"]["all"]
    (out / "pipeline.json").write_text(json.dumps(record))
    stage = out / "stages" / "all"
    if cut == "no_checkpoint":
        shutil.rmtree(stage)
        stage.mkdir()  # the attempt had made its folder
    else:
        for d in ("checkpoint-2", "checkpoint-3", "transformer"):
            shutil.rmtree(stage / d)
        rows = (stage / "logs" / "metrics.jsonl").read_text().splitlines()
        (stage / "logs" / "metrics.jsonl").write_text("\n".join(rows[:1]) + "\n")
    res = run_pipeline(cfg, resume="latest", progress=False)
    assert res.stages["all"]["step"] == 3
    assert kh.loss_sequence(stage) == kh.loss_sequence(ref / "stages" / "all")
    a, b = kh.final_weights(stage), kh.final_weights(ref / "stages" / "all")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_other_adapter_kinds_merge_to_the_same_function(tiny_pipeline_dir, tiny_cache, tmp_path, starts, kind):
    """DoRA / LoHa / LoKr → full: every adapted Linear of the merged base computes what the adapter layer computed
    (the trained adapter loaded on the pretrained transformer, in eval mode), on random inputs."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from flowtrain.train.stages import load_carried
    from flowtrain.train.trainable import adapter_config, lora_target_regex

    stages = [{"name": "adapt", "steps": 2}, {"name": "all", "steps": 1, "overrides": FULL}]
    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run")
    d["train"].update(log_every=1, learning_rate=3e-2)
    d["lora"]["kind"] = kind
    d["stages"] = stages
    cfg = FlowtrainConfig.model_validate(d)
    run_pipeline(cfg, progress=False)
    family = get_family(cfg.model.family)
    ref = family.load_transformer(cfg.model, dtype=torch.float32)
    ref.add_adapter(adapter_config(cfg.lora, lora_target_regex(cfg.lora.targets, family.lora_presets)))
    load_carried(ref, [tmp_path / "run" / "stages" / "adapt" / "checkpoint-2" / "trainable.safetensors"])
    ref.eval()
    torch.manual_seed(0)
    layers = [(n, m) for n, m in ref.named_modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    moved = 0
    for name, layer in layers:
        x = torch.randn(3, layer.get_base_layer().in_features)
        bias = starts["all"].get(f"{name}.bias")
        with torch.no_grad():
            want = layer(x)
            got = torch.nn.functional.linear(x, starts["all"][f"{name}.weight"], bias)
            plain = layer.get_base_layer()(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        moved += not torch.allclose(plain, want)
    assert moved == len(layers)  # every adapter had moved off zero, so the merge is not vacuous


def test_check_prints_what_carries_over_at_each_transition(tmp_path, capsys):
    import yaml

    from flowtrain.cli import main

    d = tiny_config_dict(tmp_path / "p", tmp_path / "c", tmp_path / "run")
    d["stages"] = [{"name": "a", "steps": 2}, {"name": "b", "steps": 2}, {"name": "c", "overrides": FULL},
                   {"name": "d", "overrides": {"lora": {"rank": 8}}}]  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d))
    assert main(["check", str(tmp_path / "p.yaml")]) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#    carries over")]
    assert plan == [
        "#    carries over from a: its LoRA adapter, by name",
        "#    carries over from b: the base with its LoRA merged in (peft's merge, in fp32); all weights train from it",
        "#    carries over from c: its full weights, as the frozen base (float32) of a new LoRA, which is relative to "
        "them (pipeline.json names the base to sample with)",
    ]
