"""configs/wan21_t2v_1_3b: lora.yaml carries the real 1.3B model's settings and the pipeline's defaults; tiny.yaml
fits the tiny pipeline."""

from __future__ import annotations

from pathlib import Path

from flowtrain.config import load_config
from flowtrain.models import get_family

ROOT = Path(__file__).parents[3] / "configs" / "wan21_t2v_1_3b"


def test_lora_config_holds_the_real_models_settings():
    family = get_family("wan")
    cfg = load_config(ROOT / "lora.yaml")
    assert (cfg.model.family, cfg.model.pretrained) == ("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert (cfg.model.max_sequence_length, cfg.model.num_frames, cfg.model.fps) == (512, 81, 16)
    assert cfg.model.expert is None and cfg.model.dtype == "bfloat16"
    steps, scale = family.sampling_defaults["steps"], family.sampling_defaults["guidance_scale"]
    assert (cfg.validation.num_inference_steps, cfg.validation.guidance_scale) == (steps, scale) == (50, 5.0)
    assert [list(s) for s in cfg.validation.sizes] == [[480, 832]]  # 480p: multiples of 16 (8× VAE, 2×2 patch)
    assert cfg.train_mode == "lora" and cfg.lora.targets in family.lora_presets
    assert cfg.timesteps.shift_mode == "resolution"  # → the scheduler's flow_shift (3.0)


def test_tiny_config_fits_the_tiny_pipeline():
    family = get_family("wan")
    tiny = load_config(ROOT / "tiny.yaml")
    assert tiny.model.family == "wan" and tiny.model.dtype == "float32"
    assert {k: getattr(tiny.model, k) for k in family.tiny_options} == dict(family.tiny_options)
    assert [list(s) for s in tiny.validation.sizes] == [[family.tiny_resolution] * 2]


def test_the_family_is_detected_from_the_pipeline(wan_dir, experts_dir):
    from flowtrain.models import detect_family

    assert detect_family(str(wan_dir)) == ("wan", "WanPipeline")
    assert detect_family(str(experts_dir)) == ("wan", "WanPipeline")  # Wan 2.2 A14B is the same pipeline class
