"""Loading what real users point at: a pipeline folder, a separate `dit` folder or file, distilled checkpoints."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from flowtrain.config import FlowtrainConfig
from flowtrain.data.manifest import CacheManifest
from flowtrain.models import ModelPathError, family_names, get_family
from flowtrain.testing.data import tiny_model
from flowtrain.train.trainable import build_transformer


@pytest.fixture(scope="module")
def finetuned_dit(tiny_pipeline_dir, tmp_path_factory):
    """A transformer that differs from the pipeline's, saved as a diffusers folder and as one .safetensors file."""
    from diffusers import Flux2Transformer2DModel

    t = Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.01)
    root = tmp_path_factory.mktemp("dit")
    t.save_pretrained(root / "folder")
    save_file(t.state_dict(), str(root / "dit.safetensors"))
    return t.state_dict(), root


@pytest.mark.parametrize("kind", ["folder", "dit.safetensors"])
def test_model_dit_replaces_the_pipeline_transformer(tiny_pipeline_dir, finetuned_dit, kind):
    expected, root = finetuned_dit
    cfg = FlowtrainConfig.model_validate(
        {
            "model": {"pretrained": str(tiny_pipeline_dir), "dit": str(root / kind), "dtype": "float32"},
            "train_mode": "full",
        }
    )
    transformer, lora = build_transformer(cfg, get_family("flux2_klein"))
    assert lora is None
    got = transformer.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_missing_model_path_is_a_clear_error(tmp_path):
    model = {"family": "flux2_klein", "pretrained": str(tmp_path / "nope"), "dtype": "float32"}
    cfg = FlowtrainConfig.model_validate({"model": model})
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        build_transformer(cfg, get_family("flux2_klein"))


def test_distilled_checkpoint_warns(tiny_pipeline_dir, tmp_path, caplog):
    distilled = tmp_path / "distilled"
    shutil.copytree(tiny_pipeline_dir, distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    index["is_distilled"] = True
    (distilled / "model_index.json").write_text(json.dumps(index))
    family = get_family("flux2_klein")
    with caplog.at_level(logging.WARNING):
        family.load_encoders(tiny_model(tiny_pipeline_dir), dtype=torch.float32, device="cpu")
    assert "distilled" not in caplog.text
    with caplog.at_level(logging.WARNING):
        family.load_encoders(tiny_model(distilled), dtype=torch.float32, device="cpu")
    assert "is_distilled=true" in caplog.text and "-base" in caplog.text


@pytest.fixture(scope="module", params=family_names())
def family_with_dit(request, tmp_path_factory):
    """(family, tiny pipeline, a model.dit folder and .safetensors file whose weights differ from the pipeline's)."""
    family = get_family(request.param)
    root = tmp_path_factory.mktemp(request.param)
    pipeline = family.save_tiny_pipeline(root / "pipeline")
    t = family.load_transformer(tiny_model(pipeline, request.param), dtype=torch.float32)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.01)
    t.save_pretrained(root / "dit")
    save_file(t.state_dict(), str(root / "dit.safetensors"))
    return family, pipeline, root, t.state_dict()


def _same_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    got = module.state_dict()
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("kind", ["dit", "dit.safetensors"])
def test_sampling_pipeline_samples_model_dit(family_with_dit, kind):
    """`flowtrain sample --lora RUN` of a run trained on `model.dit` must sample that transformer, not the pipeline's;
    an explicit `transformer=` (a full fine-tune) still wins."""
    family, pipeline, root, expected = family_with_dit
    model = tiny_model(pipeline, family.name, dit=str(root / kind))
    pipe = family.sampling_pipeline(model, dtype=torch.float32, device="cpu")
    assert _same_weights(pipe.transformer, expected)
    base = family.load_transformer(tiny_model(pipeline, family.name), dtype=torch.float32).state_dict()
    pipe = family.sampling_pipeline(model, dtype=torch.float32, device="cpu", transformer=str(pipeline))
    assert _same_weights(pipe.transformer, base) and not _same_weights(pipe.transformer, expected)


@pytest.mark.parametrize("name", family_names())
def test_a_pipeline_without_its_scheduler_fails_in_check_cache(name, tmp_path):
    """`check_cache` runs before the first step: a family that reads the scheduler config (its resolution shift,
    sampling) must refuse a pipeline folder without `scheduler/` there, naming model.pretrained and what is missing,
    not fail at step 1 with a bare OSError; a family that passes it must not need the scheduler to shift."""
    family = get_family(name)
    full = family.save_tiny_pipeline(tmp_path / "full")
    broken = tmp_path / "no-scheduler"
    shutil.copytree(full, broken, ignore=shutil.ignore_patterns("scheduler"))
    for pipeline in (full, broken):
        model = tiny_model(pipeline, name)
        fingerprint = {"settings": family.cache_settings(model), "identity": family.identity(model)}
        manifest = CacheManifest(name, fingerprint, [], {}, [])
        try:
            family.check_cache(model, manifest)
        except ModelPathError as e:
            assert pipeline == broken
            assert repr(str(broken)) in str(e) and "model.pretrained" in str(e)
            assert "scheduler/scheduler_config.json" in str(e)
            continue
        assert family.resolution_shift(model, 64) > 0
