"""`flowtrain export` for Wan: the original layout is the inverse of diffusers' own Wan checkpoint converter, for a
full fine-tune and for a LoRA."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from flowtrain import export as ex


def test_full_weights_round_trip_through_diffusers_converter(fam, wan_dir):
    """diffusers state dict → original layout → `convert_wan_transformer_to_diffusers` → the same state dict."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer").state_dict()
    original = ex.weights_to_original(state, fam.export_layout)
    assert "blocks.0.self_attn.q.weight" in original and "head.modulation" in original
    assert "blocks.1.norm3.weight" in original and "blocks.1.cross_attn.o.bias" in original
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_an_exported_lora_loads_into_wanpipeline_with_the_same_weights(fam, options, wan_dir, tmp_path):
    """A LoRA on every `all`-preset Linear (alpha ≠ rank), exported to `original` and `comfyui`: diffusers'
    `load_lora_weights` reads both (its non-diffusers Wan converter) and merges the same weights as from the
    diffusers-format file."""
    from diffusers import WanPipeline
    from peft import LoraConfig

    from flowtrain.train.trainable import lora_target_regex

    t = fam.load_transformer(options, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=12.0, init_lora_weights="gaussian",
                     target_modules=lora_target_regex("attention+ff", fam.lora_presets))  # fmt: skip
    t.add_adapter(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    src = fam.save_lora(tmp_path / "run", t, cfg)

    def merged(path):
        pipe = WanPipeline.from_pretrained(wan_dir, dtype=torch.float32)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        state = pipe.transformer.state_dict()
        return {k.replace(".base_layer", ""): v for k, v in state.items() if "lora" not in k}

    ref = merged(src)
    base = load_file(str(wan_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert max((ref[k] - base[k]).abs().max().item() for k in base) > 1e-2  # the LoRA is in there
    for fmt in ("original", "comfyui"):
        out = ex.export(src, fmt, tmp_path / f"{fmt}.safetensors", family="wan")
        keys = load_file(str(out)).keys()
        assert any(k.startswith("diffusion_model.blocks.0.self_attn.q.") for k in keys), sorted(keys)[:4]
        got = merged(out)
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= 1e-5, (fmt, worst)
