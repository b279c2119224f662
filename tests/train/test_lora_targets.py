"""LoRA targeting: Klein presets, user lists / regexes, validation before peft is touched, the count log line, and
a LoRA on every Linear (`all`) that diffusers loads back."""

from __future__ import annotations

import logging

import pytest
import torch

from flowtrain.config import FlowtrainConfig
from flowtrain.models.flux2_klein.family import LORA_PRESETS
from flowtrain.train.trainable import apply_lora, check_lora_targets, lora_target_regex


@pytest.fixture
def transformer(tiny_pipeline_dir):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(tiny_pipeline_dir, subfolder="transformer")


def _cfg(pipeline, targets, rank: int = 2) -> FlowtrainConfig:
    return FlowtrainConfig.model_validate(
        {"model": {"pretrained": str(pipeline), "dtype": "float32"}, "lora": {"rank": rank, "targets": targets}}
    )


def _linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_presets(transformer):
    """Tiny Klein: 1 double block (8 attention + 4 ff Linears), 2 single blocks (2 each), 9 global Linears."""
    att = check_lora_targets(transformer, "attention", LORA_PRESETS)
    att_ff = check_lora_targets(transformer, "attention+ff", LORA_PRESETS)
    everything = check_lora_targets(transformer, "all", LORA_PRESETS)
    assert len(att) == 8 + 2 * 2
    assert set(att) < set(att_ff) and len(att_ff) == len(att) + 4
    assert {n.split(".")[-2] + "." + n.split(".")[-1] for n in set(att_ff) - set(att)} == {
        "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"
    }  # fmt: skip
    assert set(att_ff) < set(everything) and sorted(everything) == sorted(_linears(transformer))
    assert {"x_embedder", "context_embedder", "proj_out", "norm_out.linear", "single_stream_modulation.linear",
            "time_guidance_embed.timestep_embedder.linear_1"} <= set(everything)  # fmt: skip


def test_user_lists_and_regexes(transformer):
    assert sorted(check_lora_targets(transformer, ["to_q", "add_k_proj"], LORA_PRESETS)) == [
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.to_q",
    ]
    single_out = check_lora_targets(transformer, [r"single_transformer_blocks\.\d+\.attn\.to_out"], LORA_PRESETS)
    assert single_out == ["single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out"]


def test_an_unknown_preset_fails_when_the_config_loads(tiny_pipeline_dir):
    """`check` catches it: the family's preset names are known to the config, before any model loads."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'attn_only' is not a LoRA preset of model family 'flux2_klein'"):
        _cfg(tiny_pipeline_dir, "attn_only")
    with pytest.raises(ValueError, match="unknown preset"):  # and the builder still refuses one on its own
        lora_target_regex("attn_only", LORA_PRESETS)


@pytest.mark.parametrize(
    "targets, match",
    [
        (["to_q", "to_qq"], "'to_qq' matches no Linear"),
        (["nothing_here"], "matches no Linear"),
        (["to_out"], "not Linear layers"),  # the double blocks' to_out is a ModuleList
        ([r"transformer_blocks\.0\.attn(\.to_q)?"], "not Linear layers"),  # to_q and the attention block
        (["to_q("], "not a valid regex"),
    ],
)
def test_bad_targets_fail_before_peft_is_touched(tiny_pipeline_dir, transformer, targets, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(transformer, _cfg(tiny_pipeline_dir, targets), LORA_PRESETS)
    assert not getattr(transformer, "_hf_peft_config_loaded", False)
    assert not any("lora" in n for n, _ in transformer.named_parameters())
    assert all(p.requires_grad for p in transformer.parameters())  # not even frozen


def test_apply_logs_modules_and_trainable_parameters(tiny_pipeline_dir, transformer, caplog):
    with caplog.at_level(logging.INFO, logger="flowtrain.train.trainable"):
        apply_lora(transformer, _cfg(tiny_pipeline_dir, "attention+ff", rank=2), LORA_PRESETS)
    trainable = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
    n_train = sum(p.numel() for _, p in trainable)
    line = next(r.getMessage() for r in caplog.records if "LoRA rank" in r.getMessage())
    assert "16 Linear modules" in line and f"{n_train} trainable parameters" in line


def test_lora_on_all_linears_reloads_in_diffusers(tiny_pipeline_dir, transformer, tmp_path):
    """`all` adapts the embedders, modulation and output layers too; diffusers' load_lora_weights must take it."""
    from diffusers import Flux2KleinPipeline

    from flowtrain.models import get_family

    family = get_family("flux2_klein")
    lora_cfg = apply_lora(transformer, _cfg(tiny_pipeline_dir, "all", rank=2), LORA_PRESETS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    family.save_lora(tmp_path, transformer, lora_cfg)
    pipe = Flux2KleinPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    x, txt = torch.randn(1, 64, 16, generator=g), torch.randn(1, 32, 96, generator=g)
    sigma = torch.tensor([0.5])
    transformer.eval()
    with torch.no_grad():
        cond = {"text_embeds": txt}
        ours = family.predict(transformer, x, sigma, cond, (8, 8))
        loaded = family.predict(pipe.transformer, x, sigma, cond, (8, 8))
        base = family.predict(Flux2KleinPipeline.from_pretrained(tiny_pipeline_dir).transformer, x, sigma, cond, (8, 8))
    assert (ours - loaded).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-3  # the LoRA does something
