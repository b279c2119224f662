"""Every registered model family: the Protocol holds, and the whole chain runs through the CLI on its tiny model.

prepare → precompute (family detected from the pipeline folder) → train 10 → resume to 20 → sample, for a LoRA and
for a full fine-tune. A new family is covered by registering it; nothing here names one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowtrain.cli import main
from flowtrain.models import FAMILY_PACKAGES, ModelFamily, family_names, family_options, get_family
from flowtrain.testing.data import make_image_folder

FAMILIES = family_names()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_protocol_holds(name):
    family = get_family(name)
    assert isinstance(family, ModelFamily)  # runtime_checkable: every method and attribute is there
    assert family.name == name and family_options()[name].model_fields["family"].default == name
    assert {"attention", "attention+ff", "all"} <= set(family.lora_presets)
    assert set(family.options.lora_presets) == set(family.lora_presets)  # what `check` validates lora.targets by
    assert family.pipeline_classes and family.tiny_resolution > 0
    defaults = family.sampling_defaults
    assert set(defaults) == {"steps", "guidance_scale"}
    assert isinstance(defaults["steps"], int) and defaults["steps"] > 0
    assert isinstance(defaults["guidance_scale"], float) and defaults["guidance_scale"] >= 0
    with pytest.raises(TypeError):
        defaults["steps"] = 1  # type: ignore[index]  # read-only: one shared, stateless instance per family


@pytest.mark.parametrize("name", FAMILIES)
def test_the_family_package_imports_without_torch(name):
    """The config layer imports every family's options: that must not cost a torch import."""
    code = f"import sys, {FAMILY_PACKAGES[name]} as p; p.Options; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module", params=FAMILIES)
def chain(request, tmp_path_factory):
    """A tiny pipeline of the family, prepared images and a cache made by `flowtrain precompute`."""
    family = get_family(request.param)
    root = tmp_path_factory.mktemp(request.param)
    pipeline = family.save_tiny_pipeline(root / "pipeline")
    make_image_folder(root / "images", n=6)
    assert main(["prepare", str(root / "images"), "--out", str(root / "raw"), "--quiet"]) == 0
    options = [f"model.{k}={json.dumps(v)}" for k, v in family.tiny_options.items()]
    args = ["precompute", str(root / "raw"), "--model", str(pipeline), "--out", str(root / "cache"), "--resolution",
            str(family.tiny_resolution), "--dtype", "float32", "--quiet", *options]  # fmt: skip
    assert main(args) == 0
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["family"] == request.param and manifest["num_rows"] == 6  # detected, never named
    return family, root, pipeline


def _config(root: Path, pipeline: Path, family: ModelFamily, mode: str) -> Path:
    cfg = {
        "model": {"pretrained": str(pipeline), "dtype": "float32", **family.tiny_options},
        "dataset": {"cache_dir": str(root / "cache")},
        "train": {"max_steps": 20, "batch_size": 2, "learning_rate": 1e-3, "mixed_precision": "no",
                  "caption_dropout": 0.2},
        "train_mode": mode,
        "lora": {"rank": 4},
        "checkpoint": {"every_steps": 10},
        "tracking": {"report_to": ["jsonl"], "graphs": False, "log_weights": False},
        "output_dir": str(root / f"run-{mode}"),
    }  # fmt: skip
    path = root / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_resume_sample_through_the_cli(chain, mode):
    family, root, pipeline = chain
    config, run = _config(root, pipeline, family, mode), root / f"run-{mode}"
    assert main(["train", str(config), "--max-train-steps", "10", "--quiet"]) == 0
    assert main(["train", str(config), "--resume-from-checkpoint", "latest", "--quiet"]) == 0
    losses = _losses(run)
    assert len(losses) == 20 and all(v == v for v in losses)
    assert json.loads((run / "checkpoint-20" / "state.json").read_text())["step"] == 20
    weights = ["--lora", str(run)] if mode == "lora" else ["--transformer", str(run / "transformer")]
    out = root / f"samples-{mode}"
    res = str(family.tiny_resolution)
    args = ["sample", "--model", str(pipeline), *weights, "--prompt", "a photo number 1", "--out", str(out),
            "--steps", "2", "--height", res, "--width", res]  # fmt: skip
    assert main(args) == 0
    assert (out / "000_00.png").exists() and (out / "grid.png").exists()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_family_is_documented(name):
    """docs/models/<family>.md exists and lists each of the family's own `model:` keys with its default, and its
    sampling defaults."""
    from flowtrain.config.reference import family_option_rows

    page = Path(__file__).parents[2] / "docs" / "models" / f"{name}.md"
    assert page.exists(), f"{page} is missing"
    text = page.read_text()
    for key, _, default, _ in family_option_rows(name):
        rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
        assert rows and f"`{default}`" in rows[0], f"{page}: no options row for {key} with default {default}"
    for key, value in get_family(name).sampling_defaults.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
        assert rows and f"`{value}`" in rows[0], f"{page}: no sampling-defaults row for {key} with {value}"
