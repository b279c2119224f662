"""The Qwen-Image family object: options, cache columns and checks, caption dropout, presets, paths. (The Protocol,
the torch-free package import and the CLI chain are checked for every family in tests/models/test_family_contract.py;
the shipped configs in tests/test_shipped_configs.py.)"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import pytest
import torch

from flowtrain.data.cache import Collate
from flowtrain.data.manifest import CacheError, CacheManifest
from flowtrain.models.base import Column, ModelPathError


def test_options():
    from pydantic import ValidationError

    from flowtrain.models.qwen_image import Options

    o = Options(pretrained="Qwen/Qwen-Image")
    assert (o.family, o.max_sequence_length, o.dtype) == ("qwen_image", 512, "bfloat16")
    for bad in ({"max_sequence_length": 1025}, {"family": "flux2_klein"}, {"text_encoder_layers": [1]}):
        with pytest.raises(ValidationError):
            Options(pretrained="x", **bad)
    assert all(f.description for f in Options.model_fields.values())


def test_cache_columns_and_settings(fam, encoders, options, cached):
    cols = fam.cache_columns(encoders, options, resolution=32)
    assert cols == [
        Column("latent_moments", "float32", (32, 1, 16, 16), "image"),
        Column("prompt_embeds", "float32", (None, 32), "text", max_length=64),
    ]
    assert cols[1].variable and not cols[0].variable
    assert tuple(cached["latent_moments"].shape[1:]) == cols[0].shape
    assert all(r.shape[1:] == cols[1].shape[1:] and r.dtype == torch.float32 for r in cached["prompt_embeds"])
    assert fam.cache_settings(options) == {"max_sequence_length": 64}
    with pytest.raises(ValueError, match="multiple of 4"):
        fam.cache_columns(encoders, options, resolution=30)
    fam.check_options(encoders, options)  # the tiny tokenizer's template prefix is 34 tokens: nothing to say


def test_check_cache(fam, encoders, options, qwen_dir, caplog):
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(qwen_dir, subfolder="transformer")
    identity = fam.identity(options)
    assert set(identity) == {"text_encoder", "tokenizer", "vae"}
    fp = {"model": str(qwen_dir), "settings": fam.cache_settings(options), "identity": identity}
    good = CacheManifest("qwen_image", fp, fam.cache_columns(encoders, options, resolution=32), {}, [])
    fam.check_cache(options, good, transformer)
    other_vae = {**fp, "identity": {**identity, "vae": "0" * 16}}
    for bad, message in [
        (replace(good, family="flux2_klein"), "family 'flux2_klein'"),
        (replace(good, fingerprint={**fp, "settings": {"max_sequence_length": 512}}), "max_sequence_length=512"),
        (replace(good, fingerprint=other_vae), "vae differ"),
        (replace(good, columns=[Column("prompt_embeds", "float32", (None, 48), "text", 64), good.columns[0]]), "48"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            fam.check_cache(options, bad, transformer)
    with pytest.raises(CacheError, match="allow_other_weights"):
        fam.check_cache(options, replace(good, fingerprint=other_vae))  # without the transformer too
    with caplog.at_level(logging.WARNING):
        fam.check_cache(options, replace(good, fingerprint=other_vae), transformer, allow_other_weights=True)
    assert "vae differ" in caplog.text


def test_caption_dropout_replaces_embeddings_and_masks_and_repads(fam, options, cached, make_batch):
    batch = make_batch(cached, [1, 0, 2])  # 20, 10, 9 tokens
    cond = fam.conditioning(batch, options)
    empty_batch = Collate(("prompt_embeds",))([{"prompt_embeds": cached["empty"]}])  # as the cache's empty_batch()
    empty = fam.conditioning(empty_batch, options)
    assert set(empty) == {"encoder_hidden_states"}  # 5 tokens, no padding: no mask (as the pipeline passes None)
    assert fam.drop_captions(cond, empty, torch.tensor([False, False, False])) is cond

    dropped = fam.drop_captions(cond, empty, torch.tensor([True, False, True]))
    # == the conditioning of a batch whose captions were the empty prompt in the first place
    expected = fam.conditioning(
        make_batch(
            {
                "prompt_embeds": [cached["empty"], cached["prompt_embeds"][0], cached["empty"]],
                "latent_moments": cached["latent_moments"],
            },
            [0, 1, 2],
        ),
        options,
    )
    assert set(dropped) == set(expected) == {"encoder_hidden_states", "encoder_hidden_states_mask"}
    assert dropped["encoder_hidden_states"].shape == (3, 10, 32)  # re-padded to the new longest row, not 20
    assert dropped["encoder_hidden_states_mask"].sum(1).tolist() == [5, 10, 5]
    assert all(torch.equal(dropped[k], expected[k]) for k in expected)

    everything = fam.drop_captions(cond, empty, torch.tensor([True, True, True]))
    assert set(everything) == {"encoder_hidden_states"}  # every row full length: the mask is left out
    assert torch.equal(everything["encoder_hidden_states"], cached["empty"][None].expand(3, -1, -1))


def test_lora_presets_name_real_linear_modules(qwen_dir):
    from diffusers import QwenImageTransformer2DModel

    from flowtrain.models.qwen_image.family import LORA_PRESETS

    t = QwenImageTransformer2DModel.from_pretrained(qwen_dir, subfolder="transformer")
    linear = {n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    other = {n for n, m in t.named_modules() if n and not isinstance(m, torch.nn.Linear)}

    def matched(name, names):
        rx = re.compile("|".join(f"(?:.*\\.)?(?:{p})" for p in LORA_PRESETS[name]))
        return {n for n in names if rx.fullmatch(n)}

    layers = t.config.num_layers
    assert len(matched("attention", linear)) == 8 * layers
    assert len(matched("attention+ff", linear)) == 12 * layers
    assert matched("all", linear) == linear  # every Linear of the transformer
    assert not any(matched(p, other) for p in LORA_PRESETS)  # nothing peft could not wrap


def test_pixel_multiple_reads_the_vae_config(fam, options, tmp_path):
    from flowtrain.models.qwen_image import Options

    assert fam.pixel_multiple(options) == 4  # tiny: one 2× downsampling × 2×2 patch
    (tmp_path / "vae").mkdir()
    real = {"_class_name": "AutoencoderKLQwenImage", "z_dim": 16, "temperal_downsample": [False, True, True]}
    (tmp_path / "vae/config.json").write_text(json.dumps(real))
    assert fam.pixel_multiple(Options(pretrained=str(tmp_path))) == 16  # Qwen/Qwen-Image


def test_a_missing_local_model_is_a_clear_error(fam, tmp_path):
    from flowtrain.models.qwen_image import Options

    with pytest.raises(ModelPathError, match="no such file"):
        fam.load_transformer(Options(pretrained=str(tmp_path / "nope")), dtype=torch.float32)
    with pytest.raises(ValueError, match="safetensors"):
        (tmp_path / "w.ckpt").write_bytes(b"")
        fam.load_transformer(Options(pretrained=str(tmp_path)), dtype=torch.float32, weights=str(tmp_path / "w.ckpt"))


def test_sampling_defaults_are_the_pipelines(fam):
    """steps and guidance_scale default to `QwenImagePipeline.__call__`'s num_inference_steps and true_cfg_scale
    (flowtrain's guidance_scale is the pipeline's true_cfg_scale: real CFG)."""
    import inspect

    from diffusers import QwenImagePipeline

    params = inspect.signature(QwenImagePipeline.__call__).parameters
    assert dict(fam.sampling_defaults) == {
        "steps": params["num_inference_steps"].default,
        "guidance_scale": params["true_cfg_scale"].default,
    }
