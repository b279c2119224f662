"""The FLUX.1 family object: options, caption dropout, guidance, cache columns and checks, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowtrain.models import ModelPathError, get_family
from flowtrain.models.flux1 import Options
from flowtrain.models.flux1.family import LORA_PRESETS, cache_columns_for
from flowtrain.models.flux1.tiny import tiny_transformer

FAM = get_family("flux1")


@pytest.fixture(scope="module")
def schnell_dit(tmp_path_factory) -> Path:
    """A transformer folder without guidance embedding (schnell-type), for `model.dit`."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("schnell") / "transformer"
    tiny_transformer(guidance_embeds=False).save_pretrained(path)
    return path


def test_options():
    o = Options(pretrained="black-forest-labs/FLUX.1-dev")
    assert (o.family, o.max_sequence_length, o.guidance) == ("flux1", 512, 3.5)
    with pytest.raises(ValueError):
        Options(pretrained="x", max_sequence_length=513)  # FluxPipeline refuses more than 512
    with pytest.raises(ValueError):
        Options(pretrained="x", guidanse=1.0)  # unknown keys are errors
    for name, field in Options.model_fields.items():
        assert field.description, f"model.{name} has no description"


def test_caption_dropout_drops_t5_and_pooled_for_dropped_rows_only(cached_batch, encoders, opts):
    cond = FAM.conditioning(cached_batch, opts)
    # The empty prompt's conditioning made with another guidance: dropout must not carry it over.
    empty = FAM.conditioning(FAM.encode_prompts(encoders, [""], opts), opts.model_copy(update={"guidance": 1.0}))
    drop = torch.tensor([True, False, True])
    out = FAM.drop_captions(cond, empty, drop)
    assert set(out) == {"prompt_embeds", "pooled_prompt_embeds", "guidance"}
    assert out["guidance"] is cond["guidance"] and torch.equal(out["guidance"], torch.full((3,), 3.5))
    for k in ("prompt_embeds", "pooled_prompt_embeds"):
        assert out[k].shape == cond[k].shape
        assert torch.equal(out[k][0], empty[k][0]) and torch.equal(out[k][2], empty[k][0])
        assert torch.equal(out[k][1], cond[k][1])
        assert not torch.equal(cond[k][0], empty[k][0])  # the test would be vacuous otherwise
    none = FAM.drop_captions(cond, empty, torch.zeros(3, dtype=torch.bool))
    assert all(torch.equal(none[k], cond[k]) for k in cond)


def _captured_guidance(transformer, fn):
    seen = {}

    def hook(_module, _args, kwargs):
        seen["guidance"] = kwargs.get("guidance")

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = fn()
    finally:
        handle.remove()
    return seen["guidance"], out


def test_guidance_reaches_the_transformer(opts, cached_batch, encoders, schnell_dit):
    """`conditioning` carries model.guidance as a (B,) float32 tensor (as the pipeline builds it) for a
    guidance-embedding checkpoint, and `predict` hands it to the transformer; a checkpoint without the embedding
    (known from its config alone) gets None, whatever model.guidance says."""
    transformer = FAM.load_transformer(opts, dtype=torch.float32)
    assert transformer.config.guidance_embeds  # dev-type tiny
    norm = {k: torch.tensor(v) for k, v in FAM.latent_norm(encoders).items()}
    x0, grid = FAM.training_latents(cached_batch, norm, None)
    sigma = torch.tensor([0.3, 0.6, 0.9])
    other = opts.model_copy(update={"guidance": 1.0})
    with torch.no_grad():
        cond = FAM.conditioning(cached_batch, opts)
        g, pred = _captured_guidance(transformer, lambda: FAM.predict(transformer, x0, sigma, cond, grid))
        assert g.dtype == torch.float32 and torch.equal(g, torch.full((3,), 3.5))
        cond1 = FAM.conditioning(cached_batch, other)
        g1, pred1 = _captured_guidance(transformer, lambda: FAM.predict(transformer, x0, sigma, cond1, grid))
        assert torch.equal(g1, torch.ones(3))
        assert (pred - pred1).abs().max().item() > 1e-4  # the guidance value changes the prediction
        schnell = other.model_copy(update={"dit": str(schnell_dit)})
        plain = FAM.load_transformer(schnell, dtype=torch.float32, weights=schnell.dit)
        cond2 = FAM.conditioning(cached_batch, schnell)
        assert "guidance" not in cond2
        g2, pred2 = _captured_guidance(plain, lambda: FAM.predict(plain, x0, sigma, cond2, grid))
        assert g2 is None and pred2.shape == x0.shape


def test_cache_columns_and_bytes_at_1024_for_flux1_dev(encoders, opts):
    cols = FAM.cache_columns(encoders, opts, resolution=32)
    assert [(c.name, c.dtype, c.shape, c.source) for c in cols] == [
        ("prompt_embeds", "float32", (32, 32), "text"),
        ("pooled_prompt_embeds", "float32", (32,), "text"),
        ("latent_moments", "float32", (32, 16, 16), "image"),
    ]
    assert FAM.cache_settings(opts) == {"max_sequence_length": 32}
    # FLUX.1-dev's real sizes (T5-XXL d_model 4096, CLIP-L 768, 16-channel VAE at 8×), bf16 text: docs/models/flux1.md
    real = cache_columns_for(
        t5_dim=4096, clip_dim=768, latent_channels=16, vae_factor=8, max_sequence_length=512, resolution=1024,
        text_dtype="bfloat16",
    )  # fmt: skip
    sizes = {c.name: (c.shape, c.row_bytes()) for c in real}
    assert sizes == {
        "prompt_embeds": ((512, 4096), 4_194_304),
        "pooled_prompt_embeds": ((768,), 1_536),
        "latent_moments": ((32, 128, 128), 2_097_152),
    }
    assert sum(b for _, b in sizes.values()) == 6_292_992


def _manifest(encoders, opts, *, family="flux1", identity=None, columns=None):
    from flowtrain.data.manifest import CacheManifest

    fp = {"model": "somewhere/else", "settings": FAM.cache_settings(opts), "identity": identity or FAM.identity(opts)}
    cols = FAM.cache_columns(encoders, opts, resolution=32) if columns is None else columns
    return CacheManifest(family=family, fingerprint=fp, columns=cols, latent_norm={}, shards=[])


def test_check_cache(encoders, opts, schnell_dit):
    from flowtrain.models.base import Column

    transformer = FAM.load_transformer(opts, dtype=torch.float32)
    ident = FAM.identity(opts)
    assert set(ident) == {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae"}
    FAM.check_cache(opts, _manifest(encoders, opts), transformer)
    with pytest.raises(ValueError, match="family 'flux2_klein'"):
        FAM.check_cache(opts, _manifest(encoders, opts, family="flux2_klein"))
    other = _manifest(encoders, opts, identity={**ident, "text_encoder_2": "0" * 16})
    with pytest.raises(ValueError, match=r"other weights .*\(text_encoder_2 differ"):
        FAM.check_cache(opts, other)
    FAM.check_cache(opts, other, transformer, allow_other_weights=True)
    cols = FAM.cache_columns(encoders, opts, resolution=32)
    cols[0] = Column("prompt_embeds", "float32", (32, 4096), "text")
    with pytest.raises(ValueError, match="do not fit the transformer"):
        FAM.check_cache(opts, _manifest(encoders, opts, columns=cols), transformer)
    # A transformer whose guidance embedding contradicts the config `conditioning` reads is refused up front.
    schnell = opts.model_copy(update={"dit": str(schnell_dit)})
    with pytest.raises(ValueError, match="guidance_embeds=True.*model.dit="):
        FAM.check_cache(schnell, _manifest(encoders, schnell), transformer)
    FAM.check_cache(schnell, _manifest(encoders, schnell), FAM.load_transformer(schnell, dtype=torch.float32,
                                                                              weights=schnell.dit))  # fmt: skip


def test_load_transformer_from_folder_and_single_file(opts, tmp_path):
    from safetensors.torch import save_file

    base = FAM.load_transformer(opts, dtype=torch.float32)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01)
    full = FAM.save_full(tmp_path / "run", base)
    assert full == tmp_path / "run" / "transformer" and (full / "config.json").exists()
    save_file(base.state_dict(), str(tmp_path / "dit.safetensors"))
    for weights in (str(full), str(tmp_path / "run"), str(tmp_path / "dit.safetensors")):
        loaded = FAM.load_transformer(opts, dtype=torch.float32, weights=weights)
        sd = loaded.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in base.state_dict().items()), weights
    (tmp_path / "dit.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="only .safetensors"):
        FAM.load_transformer(opts, dtype=torch.float32, weights=str(tmp_path / "dit.ckpt"))
    with pytest.raises(ModelPathError, match="no such file"):
        FAM.load_transformer(opts.model_copy(update={"pretrained": str(tmp_path / "nope")}), dtype=torch.float32)


def test_lora_presets_name_real_modules():
    """Each preset matches what it says in the real module layout (tiny model: 1 double + 2 single blocks)."""
    import re

    torch.manual_seed(0)
    names = [n for n, m in tiny_transformer().named_modules() if isinstance(m, torch.nn.Linear)]

    def matched(preset):
        rx = re.compile("|".join(f"(?:.*\\.)?(?:{p})" for p in LORA_PRESETS[preset]))  # as lora.targets joins them
        return {n for n in names if rx.fullmatch(n)}

    att, ff, every = matched("attention"), matched("attention+ff"), matched("all")
    assert len(att) == 8 + 2 * 4 and att < ff < every
    assert "single_transformer_blocks.1.proj_out" in att and "transformer_blocks.0.attn.to_add_out" in att
    assert ff - att == {
        "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_mlp",
    }  # fmt: skip
    assert every == set(names)  # `all` is every Linear, guidance embedder included


def test_shipped_flux1_dev_lora_config():
    from flowtrain.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "flux1_dev" / "lora.yaml")
    m = cfg.model
    assert (m.family, m.pretrained, m.max_sequence_length, m.guidance, m.dtype) == (
        "flux1", "black-forest-labs/FLUX.1-dev", 512, 3.5, "bfloat16",
    )  # fmt: skip
    assert cfg.train_mode == "lora" and cfg.lora.targets == "attention+ff"
    assert cfg.timesteps.shift_mode == "resolution" and cfg.validation.guidance_scale == 3.5


def test_check_options_against_the_t5_tokenizer(encoders, opts):
    FAM.check_options(encoders, opts)
    encoders.tokenizer_2.model_max_length = 16
    try:
        with pytest.raises(ValueError, match="model.max_sequence_length=32 exceeds"):
            FAM.check_options(encoders, opts)
    finally:
        encoders.tokenizer_2.model_max_length = 512


def test_sampling_defaults_are_the_pipelines():
    """steps and guidance_scale (the distilled guidance value) default to `FluxPipeline.__call__`'s."""
    import inspect

    from diffusers import FluxPipeline

    params = inspect.signature(FluxPipeline.__call__).parameters
    assert dict(FAM.sampling_defaults) == {
        "steps": params["num_inference_steps"].default,
        "guidance_scale": params["guidance_scale"].default,
    }
