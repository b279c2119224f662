"""`flowtrain export` from the command line and at the end of training; full fine-tunes in the original layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowtrain import export as ex
from flowtrain.cli import EXPORT_FORMATS, main
from flowtrain.models import get_family


def _klein_lora_run(pipeline: Path, run: Path, **lora) -> Path:
    """A run folder holding a Klein LoRA saved as training saves it (alpha ≠ rank, random B) and its config.yaml."""
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig

    family = get_family("flux2_klein")
    t = Flux2Transformer2DModel.from_pretrained(pipeline / "transformer", torch_dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8.0, target_modules=r".*attn\.(to_q|to_k|to_v|to_qkv_mlp_proj)", **lora)
    t.add_adapter(cfg)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  family: flux2_klein\n  pretrained: {pipeline}\n")
    family.save_lora(run, t, cfg)
    return run


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_formats_match_the_cli_choices():
    assert EXPORT_FORMATS == ex.FORMATS


def test_cli_writes_next_to_the_run_and_refuses_clearly(tiny_pipeline_dir, tmp_path, capsys):
    run = _klein_lora_run(tiny_pipeline_dir, tmp_path / "run")
    assert main(["export", str(run), "--format", "comfyui"]) == 0
    out = run / "pytorch_lora_weights.comfyui.safetensors"
    keys = set(load_file(str(out)))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.alpha" in keys
    assert "diffusion_model.single_blocks.1.linear1.lora_down.weight" in keys
    assert load_file(str(out))["diffusion_model.double_blocks.0.img_attn.qkv.alpha"].item() == 24.0  # 3 × 8
    # earlier output is not replaced unless asked
    assert "pass --overwrite" in _error(capsys, ["export", str(run), "--format", "comfyui"])
    assert main(["export", str(run), "--format", "comfyui", "--overwrite"]) == 0
    # --out an existing folder: the default name inside it
    (tmp_path / "loras").mkdir()
    assert main(["export", str(run), "--format", "original", "--out", str(tmp_path / "loras")]) == 0
    assert (tmp_path / "loras" / "pytorch_lora_weights.original.safetensors").is_file()
    assert not list(tmp_path.glob("loras/.*"))  # no temporary file left behind
    # diffusers: what training wrote already is
    assert main(["export", str(run), "--format", "diffusers"]) == 0
    assert str(run / ex.LORA_FILE) in capsys.readouterr().out
    # a missing source, a file that is no LoRA, a folder that is no run, an unknown family or format
    assert "no such file or folder" in _error(capsys, ["export", str(tmp_path / "nope"), "--format", "original"])
    other = tmp_path / "other.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(other))
    assert "not a flowtrain / diffusers LoRA" in _error(capsys, ["export", str(other), "--format", "original",
                                                                 "--family", "flux2_klein"])  # fmt: skip
    (tmp_path / "text.safetensors").write_text("hello")
    assert "not a safetensors file" in _error(capsys, ["export", str(tmp_path / "text.safetensors"), "--format",
                                                       "comfyui", "--family", "flux2_klein"])  # fmt: skip
    assert "neither" in _error(capsys, ["export", str(tmp_path), "--format", "comfyui"])
    alone = tmp_path / "alone" / "lora.safetensors"
    alone.parent.mkdir()
    shutil.copy(run / ex.LORA_FILE, alone)
    assert "pass --family" in _error(capsys, ["export", str(alone), "--format", "comfyui"])
    assert "unknown model family" in _error(capsys, ["export", str(alone), "--format", "comfyui", "--family", "x"])
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--format", "kohya"])
    assert e.value.code == 2


def test_a_kind_the_format_cannot_hold_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    """A DoRA adapter (peft's own, saved as training saves a LoRA) has a magnitude vector ComfyUI's LoRA keys
    and the original layout's fused modules cannot carry; its diffusers file still exports as is."""
    run = _klein_lora_run(tiny_pipeline_dir, tmp_path / "dora", use_dora=True)
    assert any("lora_magnitude_vector" in k for k in load_file(str(run / ex.LORA_FILE)))
    for fmt in ("comfyui", "original"):
        err = _error(capsys, ["export", str(run), "--format", fmt])
        assert "is a DoRA adapter" in err and "--format diffusers" in err
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "d.safetensors")]) == 0


def _full_run(pipeline: Path, run: Path, family: str) -> dict[str, torch.Tensor]:
    """A full fine-tune's run folder (its transformer/ and config.yaml); returns the transformer's weights."""
    shutil.copytree(pipeline / "transformer", run / "transformer")
    (run / "config.yaml").write_text(f"model:\n  family: {family}\n")
    return {k: v for f in sorted((run / "transformer").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_full_finetune_klein_original_is_what_diffusers_converts_back(tiny_pipeline_dir, tmp_path):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    run = tmp_path / "full"
    weights = _full_run(tiny_pipeline_dir, run, "flux2_klein")
    assert main(["export", str(run), "--format", "original"]) == 0
    original = load_file(str(run / "transformer.original.safetensors"))
    assert "double_blocks.0.img_attn.qkv.weight" in original and "final_layer.adaLN_modulation.1.weight" in original
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)
    assert main(["export", str(run), "--format", "comfyui"]) == 0  # ComfyUI loads the original checkpoint itself
    comfy = load_file(str(run / "transformer.comfyui.safetensors"))
    assert set(comfy) == set(original) and all(torch.equal(comfy[k], original[k]) for k in comfy)
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "config.json").is_file()


def test_full_finetune_flux1_and_qwen_original(tmp_path):
    """FLUX.1: diffusers' checkpoint converter hard-codes FLUX.1-dev's width (3072), so here the rows are checked
    against the diffusers weights directly: linear1 = q ‖ k ‖ v ‖ proj_mlp (weights and biases), qkv = q ‖ k ‖ v,
    the final modulation's halves swapped. Qwen-Image: the original layout is diffusers' own."""
    flux = get_family("flux1").save_tiny_pipeline(tmp_path / "flux1")
    w = _full_run(flux, tmp_path / "f", "flux1")
    o = load_file(str(ex.export(tmp_path / "f", "original")))
    s = "single_transformer_blocks.0"
    for suffix in ("weight", "bias"):
        parts = [w[f"{s}.attn.to_q.{suffix}"], w[f"{s}.attn.to_k.{suffix}"], w[f"{s}.attn.to_v.{suffix}"],
                 w[f"{s}.proj_mlp.{suffix}"]]  # fmt: skip
        assert torch.equal(o[f"single_blocks.0.linear1.{suffix}"], torch.cat(parts))
        qkv = [w[f"transformer_blocks.0.attn.add_{c}_proj.{suffix}"] for c in "qkv"]
        assert torch.equal(o[f"double_blocks.0.txt_attn.qkv.{suffix}"], torch.cat(qkv))
        scale, shift = w[f"norm_out.linear.{suffix}"].chunk(2)
        assert torch.equal(o[f"final_layer.adaLN_modulation.1.{suffix}"], torch.cat([shift, scale]))
    assert torch.equal(o["single_blocks.1.norm.key_norm.scale"], w["single_transformer_blocks.1.attn.norm_k.weight"])
    assert sum(v.numel() for v in o.values()) == sum(v.numel() for v in w.values())
    qwen = get_family("qwen_image").save_tiny_pipeline(tmp_path / "qwen")
    w = _full_run(qwen, tmp_path / "q", "qwen_image")
    o = load_file(str(ex.export(tmp_path / "q", "comfyui")))
    assert set(o) == set(w) and all(torch.equal(o[k], w[k]) for k in w)


def test_export_formats_at_the_end_of_training(tiny_pipeline_dir, tiny_cache, tmp_path):
    from flowtrain.config import FlowtrainConfig
    from flowtrain.testing.data import tiny_config_dict
    from flowtrain.train.loop import train

    d = tiny_config_dict(tiny_pipeline_dir, tiny_cache[1], tmp_path / "run", max_steps=2)
    d["lora"] = {"rank": 4, "alpha": 8, "targets": "all"}
    d["export"] = {"formats": ["comfyui", "original"]}
    result = train(FlowtrainConfig.model_validate(d), progress=False)
    run = Path(result.output_dir)
    trained = ex.lora_to_original(ex.read_lora(run / ex.LORA_FILE), ex.layout_of("flux2_klein"))
    comfy = load_file(str(run / "pytorch_lora_weights.comfyui.safetensors"))
    original = load_file(str(run / "pytorch_lora_weights.original.safetensors"))
    for name, m in trained.items():
        key = ex.ORIGINAL_PREFIX + name
        assert torch.equal(comfy[f"{key}.lora_up.weight"], m.up) and comfy[f"{key}.alpha"].item() == m.alpha
        delta = original[f"{key}.lora_B.weight"] @ original[f"{key}.lora_A.weight"]
        assert (delta - m.delta()).abs().max().item() <= 1e-6
    assert "- comfyui" in (run / "config.yaml").read_text()  # the resolved config records the key
