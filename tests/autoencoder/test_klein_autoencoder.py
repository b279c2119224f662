"""`flowtrain autoencoder`: config validation, β warm-up, latent-stat fitting as Klein uses it, and a short run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowtrain.autoencoder import AutoencoderConfig, load_autoencoder_config, train_autoencoder
from flowtrain.autoencoder.losses import kl_beta
from flowtrain.config import ConfigError
from flowtrain.models.flux2_klein.autoencoder.build import build_vae

REPO = Path(__file__).parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    """24 prepared 16 px digits (real data: scikit-learn's load_digits)."""
    from flowtrain.data.prepare import prepare
    from flowtrain.demo.digits import load_split, write_folder

    root = tmp_path_factory.mktemp("ae_data")
    split = load_split()
    write_folder(root / "images", split.train_x[:24], split.train_y[:24], 16)
    prepare(root / "images", root / "raw", progress=False)
    return root / "raw"


def test_shipped_demo_config_validates():
    cfg = load_autoencoder_config(REPO / "configs/demo/autoencoder.yaml")
    assert cfg.kind == "autoencoder" and cfg.data.resolution % 2 ** len(cfg.model.block_out_channels) == 0
    assert cfg.loss.kl_warmup_steps > 0  # the demo relies on the warm-up


def test_config_errors_name_file_and_key(tmp_path):
    bad = _write(tmp_path / "ae.yaml", "kind: autoencoder\nloss:\n  kl_wieght: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_autoencoder_config(bad)
    assert str(bad) in str(e.value) and "loss.kl_wieght" in str(e.value) and "loss.kl_weight" in str(e.value)

    odd = _write(tmp_path / "odd.yaml", "data:\n  resolution: 18\nmodel:\n  block_out_channels: [16, 32]\n")
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_autoencoder_config(odd)
    groups = _write(tmp_path / "groups.yaml", "model:\n  block_out_channels: [12, 32]\n  norm_num_groups: 8\n")
    with pytest.raises(ConfigError, match="norm_num_groups"):
        load_autoencoder_config(groups)
    other = _write(tmp_path / "other.yaml", "family: sdxl\n")
    with pytest.raises(ConfigError, match="does not train autoencoders.*flux1, flux2_klein, qwen_image, wan"):
        load_autoencoder_config(other)
    # Extends and dotted overrides work as for the training config.
    child = _write(tmp_path / "child.yaml", f"extends: {REPO / 'configs/demo/autoencoder.yaml'}\ntrain:\n  seed: 3\n")
    cfg = load_autoencoder_config(child, ["loss.kl_weight=0.5"])
    assert cfg.train.seed == 3 and cfg.loss.kl_weight == 0.5 and cfg.model.latent_channels == 4


def test_kl_beta_warms_up_linearly():
    assert [kl_beta(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_beta(0, 0.3, 0) == 0.3


def test_fitted_stats_normalise_latents_the_way_the_klein_pipeline_does(raw_dir):
    """After fitting, Klein's own patchify + BatchNorm-stat normalisation gives zero-mean, unit-variance channels."""
    from diffusers import Flux2KleinPipeline

    from flowtrain.autoencoder.data import RawImageDataset
    from flowtrain.models.flux2_klein.autoencoder.stats import fit_latent_stats

    torch.manual_seed(0)
    vae = build_vae(AutoencoderConfig().model).eval()
    data = RawImageDataset(raw_dir, 16)
    stats = fit_latent_stats(vae, data, batch_size=7, progress=False)  # uneven batches: sums must not care
    assert stats.count == len(data) == 24
    pixels = torch.stack([data[i] for i in range(len(data))])
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    patched = Flux2KleinPipeline._patchify_latents(mean)  # the reference's patchify, not ours
    bn_std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    normed = (patched - vae.bn.running_mean.view(1, -1, 1, 1)) / bn_std
    per_channel = normed.transpose(0, 1).reshape(normed.shape[1], -1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.var(1, unbiased=False) - 1).abs().max() < 1e-2  # eps=1e-4 shrinks it a hair


def test_train_autoencoder_learns_and_saves_a_loadable_vae(raw_dir, tmp_path):
    from diffusers import AutoencoderKLFlux2

    cfg = load_autoencoder_config(
        REPO / "configs/demo/autoencoder.yaml",
        [
            f"data.raw_dir={raw_dir}",
            f"output_dir={tmp_path / 'ae'}",
            "model.block_out_channels=[8, 16]",
            "model.norm_num_groups=4",
            "train.max_steps=30",
            "train.batch_size=8",
            "train.log_every=5",
            "loss.kl_warmup_steps=20",
            "lr_scheduler.warmup_steps=0",
            "lr_scheduler.name=constant",
            "tracking.report_to=[jsonl]",
        ],
    )
    result = train_autoencoder(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ae/logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rec" in r] == list(range(5, 35, 5))
    assert rows[0]["beta"] == pytest.approx(cfg.loss.kl_weight * 5 / 20)  # warming up
    assert rows[-2]["beta"] == cfg.loss.kl_weight
    assert rows[-2]["rec"] < 0.6 * rows[0]["rec"]  # it learns
    vae = AutoencoderKLFlux2.from_pretrained(result.vae_dir)
    stats = json.loads((tmp_path / "ae/latent_stats.json").read_text())
    assert torch.allclose(vae.bn.running_mean, torch.tensor(stats["latent_mean"]), atol=1e-6)
    assert torch.allclose(
        torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps), torch.tensor(stats["latent_std"]), atol=1e-6
    )
    assert (tmp_path / "ae/config.yaml").exists() and (tmp_path / "ae/graphs/loss.png").exists()


def test_cli_autoencoder_reports_missing_raw_dir(tmp_path, capsys):
    from flowtrain.cli import main

    cfg = _write(tmp_path / "ae.yaml", "kind: autoencoder\ndata:\n  resolution: 16\n")
    assert main(["autoencoder", str(cfg), f"output_dir={tmp_path / 'o'}", "--quiet"]) == 2
    assert "data.raw_dir" in capsys.readouterr().err


def test_families_train_autoencoders_through_the_generic_trainer(raw_dir, tmp_path):
    """Every family can train its VAE, and the generic trainer (what the CLI and the pipelines' autoencoder stage
    call) builds the VAE of the config's family: here FLUX.1's AutoencoderKL."""
    from flowtrain.models import TrainsAutoencoder, get_family

    for name in ("flux2_klein", "flux1", "qwen_image", "wan"):  # every family's VAE has a training forward
        assert isinstance(get_family(name), TrainsAutoencoder)
    cfg = load_autoencoder_config(
        REPO / "configs/demo/autoencoder.yaml",
        ["family=flux1", f"data.raw_dir={raw_dir}", "data.resolution=16", "model.block_out_channels=[8, 16]",
         "model.norm_num_groups=4", "train.max_steps=2", "train.batch_size=4", "tracking.report_to=[jsonl]",
         "lr_scheduler.warmup_steps=0", "stats.fit=false"],
    )  # fmt: skip
    result = train_autoencoder(cfg, progress=False, run_dir=tmp_path / "ae")
    assert result.step == 2 and (tmp_path / "ae/vae/config.json").exists()
    assert json.loads((tmp_path / "ae/vae/config.json").read_text())["_class_name"] == "AutoencoderKL"
