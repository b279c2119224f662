"""Validation sampling during training: images at exactly the configured steps, equal to the reference pipeline's
for the untrained model, different after training, and no side effects on the training itself."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flowtrain.config import FlowtrainConfig
from flowtrain.models import get_family
from flowtrain.testing.data import TINY_SEQ, tiny_config_dict
from flowtrain.train.loop import train
from flowtrain.train.validation import Validator, image_name

PROMPTS = ["a photo of a dog", "a red square on a white background"]
SIZES = [(32, 32), (32, 48)]
SEED = 5


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def validated(tiny_pipeline_dir, tiny_cache, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("validation") / "run"
    d = tiny_config_dict(
        tiny_pipeline_dir, tiny_cache[1], out, max_steps=4, learning_rate=0.2
    )  # high: the LoRA must move
    d["tracking"] = {"report_to": ["jsonl"]}
    d["checkpoint"] = {"every_steps": None}
    d["validation"] = {
        "every_steps": 2,
        "at_start": True,
        "prompts": PROMPTS,
        "num_inference_steps": 2,
        "guidance_scale": 2.0,  # real CFG: the "" negative prompt is embedded too
        "seed": SEED,
        "sizes": [list(s) for s in SIZES],
    }
    cfg = FlowtrainConfig.model_validate(d)
    result = train(cfg, progress=False)
    return SimpleNamespace(cfg=cfg, out=out, result=result, samples=out / "samples", pipeline=tiny_pipeline_dir)


def test_images_at_exactly_the_configured_steps(validated) -> None:
    expected = {
        image_name(step, i, SEED + i, size) for step in (0, 2, 4) for i in range(len(PROMPTS)) for size in SIZES
    }
    expected |= {f"step{step:06d}_grid.png" for step in (0, 2, 4)}
    assert {p.name for p in validated.samples.glob("*.png")} == expected
    assert "step000002_01_6_32x48.png" in expected  # the documented name: step, prompt index, seed, size
    with Image.open(validated.samples / "step000002_01_6_32x48.png") as im:
        assert im.size == (48, 32)  # width × height
    with Image.open(validated.samples / "step000004_grid.png") as grid:
        assert grid.size == (2 * 48, 2 * 32)  # a row per prompt, a column per size
    assert "a red square" in (validated.samples / "prompts.txt").read_text()


def test_untrained_images_equal_the_reference_pipeline_and_trained_ones_differ(validated) -> None:
    from flowtrain.sample import generate, load_sampling_pipeline
    from flowtrain.testing.data import tiny_model

    model = tiny_model(validated.pipeline, max_sequence_length=TINY_SEQ)
    pipe = load_sampling_pipeline(model, device="cpu")
    for h, w in SIZES:
        base = generate(pipe, PROMPTS, model, seed=SEED, steps=2, guidance_scale=2.0, height=h, width=w)
        for i, ref in enumerate(base):
            ref_px = np.asarray(ref.convert("RGB"), dtype=np.int16)
            start = _pixels(validated.samples / image_name(0, i, SEED + i, (h, w)))
            end = _pixels(validated.samples / image_name(4, i, SEED + i, (h, w)))
            # LoRA B starts at zero: before training, the validation path is the reference sampler itself
            assert np.abs(start - ref_px).max() <= 1, (h, w, i)
            assert np.abs(end - ref_px).mean() > 5.0, "the trained LoRA changes the validation images"


def test_training_is_left_as_it_was(validated) -> None:
    result = validated.result
    assert result.step == 4 and sorted(result.losses) == [1, 2, 3, 4]
    assert result.transformer.training  # back in train mode after sampling


def test_sampling_does_not_touch_the_global_rng(validated) -> None:
    cfg = validated.cfg.model_copy(deep=True)
    cfg.validation.sizes, cfg.validation.guidance_scale = [(32, 32)], 1.0
    v = Validator(cfg, get_family("flux2_klein"), validated.out / "again")
    before = torch.get_rng_state()
    paths = v.run(7, validated.result.transformer, torch.device("cpu"))
    assert torch.equal(before, torch.get_rng_state())
    assert [p.name for p in paths] == ["step000007_00_5.png", "step000007_01_6.png", "step000007_grid.png"]


def test_config_problems_fail_before_training(validated, tmp_path) -> None:
    cfg = validated.cfg.model_copy(deep=True)
    family = get_family("flux2_klein")
    cfg.validation.sizes = [(30, 32)]
    with pytest.raises(ValueError, match=r"multiples of 4.*\[\[32, 32\]\]"):
        Validator(cfg, family, tmp_path)
    cfg.validation.sizes = []
    assert Validator(cfg, family, tmp_path, resolution=32).sizes == [(32, 32)]  # default: the cache's resolution
    cfg.validation = cfg.validation.model_copy(update={"prompts": [], "prompts_file": str(tmp_path / "missing.txt")})
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        Validator(cfg, family, tmp_path, resolution=32)
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    cfg.validation = cfg.validation.model_copy(update={"prompts_file": str(tmp_path / "p.txt")})
    assert Validator(cfg, family, tmp_path, resolution=32).prompts == ["first", "second"]


def test_variable_length_conditioning_is_collated_as_a_batch_of_one(validated, tmp_path) -> None:
    """A family whose text column is variable-length (`encode_prompts` gives a list of (L_i, D) rows) gets each
    prompt's conditioning as the cache reader collates a batch of 1: (1, L, D) and a (1, L) bool mask."""

    class Pipe:
        components = {"text_encoder": None, "tokenizer": None, "vae": None}
        vae = torch.nn.Identity()

        def set_progress_bar_config(self, **_) -> None: ...

        def register_modules(self, **_) -> None: ...

    class Family:  # only what Validator asks before sampling
        sampling_defaults = {"steps": 2, "guidance_scale": 4.0}

        def pixel_multiple(self, model) -> int:
            return 16

        def load_encoders(self, model, *, dtype, device) -> Pipe:
            return Pipe()

        def encode_prompts(self, pipe, prompts, model) -> dict[str, list[torch.Tensor]]:
            return {"text": [torch.ones(len(p.split()) + 1, 4) for p in prompts]}

    v = Validator(validated.cfg, Family(), tmp_path)
    v._load(torch.device("cpu"))
    assert [{k: tuple(t.shape) for k, t in c.items()} for c in v._conds] == [
        {"text": (1, len(p.split()) + 1, 4), "text_mask": (1, len(p.split()) + 1)} for p in PROMPTS
    ]
    assert v._conds[0]["text_mask"].dtype == torch.bool and v._conds[0]["text_mask"].all()
    assert set(v._negative) == {"text", "text_mask"} and v._negative["text"].shape == (1, 1, 4)  # "": one row
