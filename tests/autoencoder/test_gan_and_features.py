"""GAN, perceptual loss, EMA, samples, graphs and the console line of the autoencoder trainer, on real (tiny) VAEs
and real data (16 px digits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowtrain.autoencoder import load_autoencoder_config, train_autoencoder
from flowtrain.autoencoder.discriminator import PatchDiscriminator
from flowtrain.autoencoder.step import autoencoder_half, discriminator_half

from .conftest import REPO, tiny_overrides

DEMO = REPO / "configs/demo/autoencoder.yaml"


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines() if line.strip()]


def test_each_half_of_a_gan_step_sends_gradients_only_to_its_own_network(digits_raw, tmp_path):
    from flowtrain.autoencoder.data import RawImageDataset
    from flowtrain.models import get_family

    cfg = load_autoencoder_config(DEMO, tiny_overrides(digits_raw, tmp_path, "gan.enabled=true",
                                                       "gan.discriminator_layers=2", "gan.r1_weight=1.0"))  # fmt: skip
    torch.manual_seed(0)
    vae = get_family("flux2_klein").build_autoencoder(cfg.model)
    disc = PatchDiscriminator(layers=2, channels=8)
    data = RawImageDataset(digits_raw, 16)
    pixels = torch.stack([data[i] for i in range(4)])
    noise = torch.Generator().manual_seed(0)

    out = autoencoder_half(vae, pixels, cfg, beta=1e-3, gan_on=True, noise=noise, discriminator=disc)
    out.loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # D took part in the forward, but gets no gradient
    assert all(p.requires_grad for p in disc.parameters())  # and is trainable again afterwards
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0 and vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert {"rec", "kl", "g", "g_weight"} <= out.terms.keys() and out.terms["g_weight"] > 0

    vae.zero_grad(set_to_none=True)
    d_loss, terms = discriminator_half(disc, pixels, out.recon, cfg)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())  # the D step never reaches the autoencoder
    assert all(p.grad is not None for p in disc.parameters())  # (the last bias's hinge gradient is −½ + ½ = 0)
    assert all(p.grad.abs().sum() > 0 for n, p in disc.named_parameters() if "weight" in n)
    assert terms["r1"] > 0 and d_loss.item() == pytest.approx((terms["d"] + 0.5 * terms["r1"]).item(), rel=1e-6)


def test_a_gan_run_logs_d_and_g_losses_that_move(digits_raw, tiny_backbone, tmp_path):
    """GAN from step 4 with R1, the perceptual loss, EMA, samples every 5 steps: every term is logged, G and D
    appear only from the discriminator's start step and change from step to step."""
    out = tmp_path / "gan"
    cfg = load_autoencoder_config(
        DEMO,
        tiny_overrides(
            digits_raw, out,
            "train.max_steps=12", "gan.enabled=true", "gan.start_step=4", "gan.discriminator_layers=2",
            "gan.discriminator_channels=16", "gan.r1_weight=0.5", "perceptual.weight=0.5",
            f"perceptual.model={tiny_backbone}", "ema.enabled=true", "ema.decay=0.9", "samples.every_steps=5",
            "samples.count=4", "checkpointing.every_steps=null",
        ),
    )  # fmt: skip
    result = train_autoencoder(cfg, progress=False)
    rows = [r for r in _rows(out) if "rec" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all("g" not in r and "d" not in r for r in rows[:4])
    gan_rows = rows[4:]
    assert all({"g", "d", "r1", "g_weight", "perceptual"} <= r.keys() for r in gan_rows)
    for key in ("g", "d"):
        values = [r[key] for r in gan_rows]
        assert len(set(values)) == len(values), f"{key} does not move: {values}"
    assert all(r["perceptual"] > 0 for r in rows)
    # samples: input | recon(mode) | recon(sample), one row per image
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-000005.png", "step-000010.png", "step-000012.png"]
    assert Image.open(out / "samples/step-000012.png").size == (3 * 16, 4 * 16)
    assert (out / "graphs/autoencoder_losses.png").exists() and (out / "graphs/loss.png").exists()
    # EMA: vae/ holds the average, vae_trained/ the last weights; they differ
    from safetensors.torch import load_file

    ema_w = load_file(str(result.vae_dir / "diffusion_pytorch_model.safetensors"))
    raw_w = load_file(str(out / "vae_trained/diffusion_pytorch_model.safetensors"))
    assert ema_w.keys() == raw_w.keys()
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in ema_w)


def test_gan_only_mode_trains_on_the_generator_loss_alone(digits_raw, tmp_path):
    out = tmp_path / "only"
    cfg = load_autoencoder_config(
        DEMO,
        tiny_overrides(digits_raw, out, "train.max_steps=4", "gan.enabled=true", "gan.only=true", "gan.weight=0.25",
                       "gan.discriminator_layers=2", "gan.loss=non_saturating"),
    )  # fmt: skip
    train_autoencoder(cfg, progress=False)
    rows = [r for r in _rows(out) if "rec" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["loss"] == pytest.approx(0.25 * r["g"], rel=1e-6) and "g_weight" not in r


def test_console_line_names_every_loss():
    from flowtrain.autoencoder.train import console_line

    line = console_line({"rec": 0.1, "kl": 2.0, "g": 0.3, "d": 0.9, "perceptual": 0.05, "s_per_step": 0.25})
    assert line == "rec 0.1000  KL 2  G 0.3000  D 0.9000  perc 0.0500  0.250 s/batch"


def test_perceptual_distance_on_a_transformers_backbone(tiny_backbone):
    from transformers import AutoModel

    from flowtrain.autoencoder.perceptual import IMAGENET_MEAN, IMAGENET_STD, PerceptualDistance

    dist = PerceptualDistance(str(tiny_backbone))
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    assert dist(x, x.detach()).item() == 0.0
    d = dist(x, y)
    # by hand: unit-normalised tokens of every layer after the embeddings, squared distance summed over channels
    backbone = AutoModel.from_pretrained(tiny_backbone).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def feats(v):
        return backbone(pixel_values=((v + 1) / 2 - mean) / std, output_hidden_states=True).hidden_states[1:]

    expected = sum(
        (a / a.norm(dim=-1, keepdim=True) - b / b.norm(dim=-1, keepdim=True)).square().sum(-1).mean()
        for a, b in zip(feats(x.detach()), feats(y), strict=True)
    )
    assert d.item() == pytest.approx(expected.item(), rel=1e-5)
    d.backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in dist.backbone.parameters())  # frozen


def test_flux1_autoencoder_trains_and_fits_its_shift_and_scale(digits_raw, tmp_path):
    """The same trainer on another family's VAE: FLUX.1's AutoencoderKL, whose latents are normalised by
    (z − shift_factor)·scaling_factor, fitted after training."""
    from diffusers import AutoencoderKL

    from flowtrain.autoencoder.data import RawImageDataset

    out = tmp_path / "flux1"
    cfg = load_autoencoder_config(
        DEMO, tiny_overrides(digits_raw, out, "family=flux1", "train.max_steps=6", "stats.fit=true")
    )
    result = train_autoencoder(cfg, progress=False)
    vae = AutoencoderKL.from_pretrained(result.vae_dir).eval()
    assert vae.config.shift_factor == result.stats["shift_factor"] and vae.config.scaling_factor > 0
    data = RawImageDataset(digits_raw, 16)
    with torch.no_grad():
        z = vae.encode(torch.stack([data[i] for i in range(len(data))])).latent_dist.mean
    x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(x0.mean().item()) < 1e-4 and x0.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert [r["step"] for r in _rows(out) if "rec" in r] == list(range(1, 7))


def test_qwen_image_autoencoder_trains_on_one_frame_clips_and_fits_its_latent_stats(digits_raw, tmp_path):
    """The same trainer on Qwen-Image's causal 3-D VAE (AutoencoderKLQwenImage): images go through it as one-frame
    clips (data.frames 1, (3, 1, R, R)), and latents_mean / latents_std are fitted so that the normalised posterior
    means are N(0, 1) per channel on the data, as the pipeline normalises them."""
    from diffusers import AutoencoderKLQwenImage

    from flowtrain.autoencoder.data import RawClipDataset, raw_dataset

    out = tmp_path / "qwen"
    extra = ["family=qwen_image", "model.block_out_channels=[8, 16, 16]", "model.latent_channels=4", "data.frames=1",
             "train.max_steps=3", "stats.fit=true"]  # fmt: skip
    over = tiny_overrides(digits_raw, out, *extra)
    cfg = load_autoencoder_config(DEMO, over)
    with pytest.raises(ValueError, match="patch discriminator takes images"):
        load_autoencoder_config(DEMO, [*over, "gan.enabled=true"])
    data = raw_dataset(cfg.data)
    assert isinstance(data, RawClipDataset) and data[0].shape == (3, 1, 16, 16)
    result = train_autoencoder(cfg, progress=False)
    vae = AutoencoderKLQwenImage.from_pretrained(result.vae_dir).eval()
    assert [r["step"] for r in _rows(out) if "rec" in r] == [1, 2, 3]
    with torch.no_grad():
        z = vae.encode(torch.stack([data[i] for i in range(len(data))])).latent_dist.mean  # (N, 4, 1, 4, 4)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    x0 = ((z - mean) / std).transpose(0, 1).flatten(1)  # per channel
    assert x0.mean(1).abs().max().item() < 1e-4
    assert torch.allclose(x0.std(1, unbiased=False), torch.ones(4), atol=1e-3)
