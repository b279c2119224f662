"""A user names a family once, or not at all: detected from the pipeline's model_index.json; a configured family
that contradicts it, or one nobody registered, is one clear error; family options are validated against the model."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError

from flowtrain.cli import main
from flowtrain.config import FlowtrainConfig
from flowtrain.models import detect_family


def test_family_is_detected_from_model_index(tiny_pipeline_dir):
    assert detect_family(str(tiny_pipeline_dir)) == ("flux2_klein", "Flux2KleinPipeline")
    cfg = FlowtrainConfig.model_validate({"model": {"pretrained": str(tiny_pipeline_dir)}})
    assert cfg.model.family == "flux2_klein" and cfg.model.text_encoder_layers == [9, 18, 27]


def test_a_contradicting_family_names_both(tiny_pipeline_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_pipeline_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "SomeOtherPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValidationError, match="model.family='flux2_klein' but .* is a SomeOtherPipeline"):
        FlowtrainConfig.model_validate({"model": {"family": "flux2_klein", "pretrained": str(other)}})
    with pytest.raises(ValidationError, match="'SomeOtherPipeline' is not one flowtrain trains.*set model.family"):
        FlowtrainConfig.model_validate({"model": {"pretrained": str(other)}})


def test_check_refuses_an_unknown_family(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  family: nope\n  pretrained: some/model\n")
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.family" in err and "unknown model family 'nope'" in err and "flux2_klein" in err
    assert "Traceback" not in err


def test_family_keys_are_validated_with_the_family(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  family: flux2_klein\n  pretrained: some/model\n  text_encoder_layer: [9]\n")
    assert main(["check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.text_encoder_layer: unknown key; did you mean `model.text_encoder_layers`?" in err


def test_precompute_validates_layers_against_the_loaded_encoder(tiny_pipeline_dir, tiny_cache, tmp_path, capsys):
    args = ["precompute", str(tiny_cache[0]), "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "c"),
            "--resolution", "32", "--quiet", "model.text_encoder_layers=[9,18,99]"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.text_encoder_layers=[9, 18, 99]" in err and "has 27 layers" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_sample_reads_only_the_model_section_of_a_runs_config(tmp_path):
    """A run written by an older flowtrain may hold keys this one has moved; sampling needs only `model:`."""
    from flowtrain.cli import _run_model_near
    from flowtrain.config import ConfigError, load_config

    run = tmp_path / "run"
    run.mkdir()
    text = "model:\n  family: flux2_klein\n  pretrained: org/model\ntimesteps:\n  reference_steps: 50\n"
    (run / "config.yaml").write_text(text)
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert _run_model_near(str(run / "pytorch_lora_weights.safetensors")) == {
        "family": "flux2_klein",
        "pretrained": "org/model",
    }
    with pytest.raises(ConfigError, match="timesteps.reference_steps moved to model.shift_reference_steps"):
        load_config(run / "config.yaml")
