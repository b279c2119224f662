"""Wan 2.2 A14B-style two-expert pipelines (`transformer` + `transformer_2` + `boundary_ratio`, diffusers 0.42.1's
WanPipeline): one expert is trained per run on its own σ range, its LoRA is named after it and loads into its slot
with diffusers' `load_lora_weights(..., load_into_transformer_2=True)`, and sampling runs both stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flowtrain.testing.data import tiny_model
from flowtrain.testing.training import train_config
from flowtrain.train.loop import train

BOUNDARY, RES, FRAMES = 0.875, 32, 9


@pytest.fixture(scope="module")
def experts_cache(experts_dir, video_cache_writer, tmp_path_factory):
    return video_cache_writer(tmp_path_factory.mktemp("c") / "cache", experts_dir, expert="low_noise")


def _cfg(pipeline: Path, cache: Path, out: Path, expert: str, **sections):
    sections.setdefault("timesteps", {"shift_mode": "resolution"})
    return train_config(pipeline, cache, out, family="wan", model={"num_frames": FRAMES, "expert": expert},
                        **sections)  # fmt: skip


def test_the_expert_must_fit_the_pipeline(fam, experts_dir, wan_dir):
    with pytest.raises(ValueError, match="has two experts.*set model.expert to high_noise"):
        fam.load_transformer(tiny_model(experts_dir, "wan"), dtype=torch.float32)
    with pytest.raises(ValueError, match="model.expert='low_noise'.*has one transformer"):
        fam.load_transformer(tiny_model(wan_dir, "wan", expert="low_noise"), dtype=torch.float32)
    with pytest.raises(ValueError, match="needs model.pretrained=.*model_index.json"):
        fam.sigma_range(tiny_model(experts_dir / "transformer", "wan", expert="low_noise"))  # no index: no boundary
    assert fam.sigma_range(tiny_model(wan_dir, "wan")) is None
    assert fam.sigma_range(tiny_model(experts_dir, "wan", expert="high_noise")) == (BOUNDARY, 1.0)
    assert fam.sigma_range(tiny_model(experts_dir, "wan", expert="low_noise")) == (0.0, BOUNDARY)


def test_a_ti2v_pipeline_is_refused(fam, wan_dir, tmp_path):
    """Wan 2.2 TI2V-5B (`expand_timesteps`: per-token timesteps) is another training path: refused, not guessed."""
    import json
    import shutil

    ti2v = tmp_path / "ti2v"
    shutil.copytree(wan_dir, ti2v)
    index = json.loads((ti2v / "model_index.json").read_text())
    (ti2v / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ValueError, match="TI2V pipeline.*expand_timesteps"):
        fam.load_transformer(tiny_model(ti2v, "wan"), dtype=torch.float32)


def test_each_expert_loads_its_own_transformer(fam, experts_dir):
    from diffusers import WanPipeline

    ref = WanPipeline.from_pretrained(experts_dir, dtype=torch.float32)
    assert ref.config.boundary_ratio == BOUNDARY
    for expert, slot in (("high_noise", ref.transformer), ("low_noise", ref.transformer_2)):
        t = fam.load_transformer(tiny_model(experts_dir, "wan", expert=expert), dtype=torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), slot.state_dict().values(), strict=True))
    assert not torch.equal(ref.transformer.proj_out.weight, ref.transformer_2.proj_out.weight)


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_an_expert_trains_on_its_own_sigma_range_and_names_its_lora(fam, experts_dir, experts_cache, tmp_path,
                                                                    monkeypatch, expert):  # fmt: skip
    sigmas: list[torch.Tensor] = []
    predict = fam.predict

    def recording(transformer, x_t, sigma, cond, shape):
        sigmas.append(sigma.detach().clone())
        return predict(transformer, x_t, sigma, cond, shape)

    monkeypatch.setattr(fam, "predict", recording)
    run = tmp_path / "run"
    train(_cfg(experts_dir, experts_cache, run, expert, train={"max_steps": 6}), progress=False)
    drawn = torch.cat(sigmas)
    assert len(drawn) == 12
    if expert == "high_noise":
        assert bool((drawn >= BOUNDARY).all()) and float(drawn.min()) < 0.99
    else:
        assert bool((drawn < BOUNDARY).all()) and float(drawn.max()) > 0.2
    assert [p.name for p in run.glob("*.safetensors")] == [f"pytorch_lora_weights_{expert}.safetensors"]


def test_the_low_noise_lora_loads_into_transformer_2_and_gives_flowtrains_video(
    fam, experts_dir, experts_cache, tmp_path, validation_run, record_property
):
    """Validation (the trained low-noise expert in `transformer_2`, the base high-noise expert in `transformer`) ==
    `flowtrain sample --lora RUN` (the run's config names the expert) == plain diffusers with
    `load_lora_weights(file, load_into_transformer_2=True)`, and differs from the base model."""
    from diffusers import WanPipeline

    def config(run: Path, validation: dict):
        return _cfg(experts_dir, experts_cache, run, "low_noise", validation=validation,
                    train={"max_steps": 2, "learning_rate": 1e-2})  # fmt: skip

    prompts = ["a red square moving left"]
    ours, sample = validation_run(experts_dir, prompts, tmp_path, config)
    same = sample("same", f"model.num_frames={FRAMES}")
    record_property("png_max_diff", int(np.abs(ours[0] - same[0]).max()))
    assert int(np.abs(ours[0] - same[0]).max()) <= 1

    lora = tmp_path / "run" / "pytorch_lora_weights_low_noise.safetensors"
    kw = dict(prompt=prompts[0], negative_prompt="", guidance_scale=2.0, height=RES, width=RES, num_frames=FRAMES,
              num_inference_steps=3, max_sequence_length=32, output_type="np")  # fmt: skip
    fresh = WanPipeline.from_pretrained(experts_dir, dtype=torch.float32)
    fresh.set_progress_bar_config(disable=True)
    base = fresh(generator=torch.Generator().manual_seed(5), **kw).frames[0]
    fresh.load_lora_weights(str(lora), load_into_transformer_2=True)
    assert not hasattr(fresh.transformer, "peft_config") and hasattr(fresh.transformer_2, "peft_config")
    ref = fresh(generator=torch.Generator().manual_seed(5), **kw).frames[0]
    model = tiny_model(experts_dir, "wan", expert="low_noise", num_frames=FRAMES)
    pipe = fam.sampling_pipeline(model, dtype=torch.float32, device="cpu", lora=str(lora.parent))  # the run folder
    gen = fam.generate(pipe, prompts, model, generators=[torch.Generator().manual_seed(5)], height=RES, width=RES,
                       steps=3, guidance_scale=2.0, output_type="np")[0]  # fmt: skip
    record_property("video_diff", float(np.abs(gen - ref).max()))
    record_property("diff_from_base", float(np.abs(ref - base).max()))
    assert np.abs(gen - ref).max() <= 1e-5 and np.abs(ref - base).max() > 1e-3
