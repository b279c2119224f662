"""Every YAML config we ship validates, and the Klein-4B ones hold the reference's settings."""

from pathlib import Path

import pytest

from flowtrain.config import load_config

ROOT = Path(__file__).parents[1] / "configs"
# configs/accelerate/ holds `accelerate launch --config_file` files, not flowtrain configs (checked below).
LAUNCH_CONFIGS = sorted((ROOT / "accelerate").glob("*.yaml"))
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if p not in LAUNCH_CONFIGS)


def test_there_are_shipped_configs():
    names = {str(p.relative_to(p.parents[1])) for p in CONFIGS}
    assert {"klein4b/base.yaml", "klein4b/lora.yaml", "klein4b/tiny.yaml"} <= names
    assert {"qwen_image/lora.yaml", "qwen_image/tiny.yaml"} <= names


def test_every_family_ships_a_real_and_a_tiny_config():
    """A config with the real model's settings and one for the family's tiny pipeline (a folder path), per family."""
    import yaml

    from flowtrain.models import family_names

    shipped: dict[str, set[str]] = {}
    for path in CONFIGS:
        if (yaml.safe_load(path.read_text()) or {}).get("kind") in (None, "train"):
            cfg = load_config(path)
            kind = "tiny" if path.name == "tiny.yaml" else "real"
            shipped.setdefault(cfg.model.family, set()).add(kind)
    for family in family_names():
        assert shipped.get(family, set()) >= {"tiny", "real"}, (family, shipped.get(family))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_validates(path):
    import yaml

    if (yaml.safe_load(path.read_text()) or {}).get("kind") not in (None, "train"):
        pytest.skip("not a training config")  # e.g. autoencoder / demo configs validate in their own tests
    load_config(path)


def test_klein4b_lora_matches_reference_settings():
    cfg = load_config(Path(__file__).parents[1] / "configs/klein4b/lora.yaml")
    assert cfg.model.pretrained.endswith("FLUX.2-klein-base-4B")  # base, not distilled
    assert cfg.model.text_encoder_layers == [9, 18, 27]
    assert cfg.model.max_sequence_length == 512
    assert cfg.train_mode == "lora" and cfg.lora.targets == "attention+ff"


def test_qwen_image_configs_match_the_pipeline_and_the_tiny_model():
    """lora.yaml: Qwen/Qwen-Image with the pipeline's defaults (docs/models/qwen_image.md); tiny.yaml: the settings
    that fit the tiny pipeline (the family's tiny_options and tiny_resolution)."""
    from flowtrain.models import get_family

    root = Path(__file__).parents[1] / "configs/qwen_image"
    family = get_family("qwen_image")
    real, tiny = load_config(root / "lora.yaml"), load_config(root / "tiny.yaml")
    assert (real.model.family, real.model.pretrained) == ("qwen_image", "Qwen/Qwen-Image")
    assert (real.model.max_sequence_length, real.model.dtype) == (512, "bfloat16")
    assert (real.validation.num_inference_steps, real.validation.guidance_scale) == (50, 4.0)
    assert real.train_mode == "lora" and real.lora.targets in family.lora_presets
    assert real.timesteps.shift_mode == tiny.timesteps.shift_mode == "resolution"
    assert tiny.model.family == "qwen_image" and tiny.model.dtype == "float32"
    assert {k: getattr(tiny.model, k) for k in family.tiny_options} == dict(family.tiny_options)
    assert [list(s) for s in tiny.validation.sizes] == [[family.tiny_resolution] * 2]


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_shipped_launch_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    launch = load_config_from_file(str(path))
    assert launch.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    if launch.distributed_type.value == "DEEPSPEED":  # the stage the file name promises
        assert f"zero{launch.deepspeed_config['zero_stage']}" == path.stem


def test_fsdp2_launch_config_is_fsdp_version_2_with_sharded_checkpoints():
    """What docs/distributed.md#fsdp2 describes (tests/dist/test_fsdp2_cpu.py launches with this file)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp2.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.mixed_precision == "bf16"
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # one unit per block (_no_split_modules)
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
