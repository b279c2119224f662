"""Shared fixtures: a few real prepared images (scikit-learn's digits) and a tiny random vision backbone."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def digits_raw(tmp_path_factory) -> Path:
    """24 prepared 16 px digits (`flowtrain prepare` shards)."""
    from flowtrain.data.prepare import prepare
    from flowtrain.demo.digits import load_split, write_folder

    root = tmp_path_factory.mktemp("ae_digits")
    split = load_split()
    write_folder(root / "images", split.train_x[:24], split.train_y[:24], 16)
    prepare(root / "images", root / "raw", progress=False)
    return root / "raw"


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer DINOv2 saved as a model folder: the perceptual loss loads it by path, as it
    loads `facebook/dinov2-small` by name."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=4
    )
    path = tmp_path_factory.mktemp("tiny_dinov2") / "dinov2"
    Dinov2Model(cfg).save_pretrained(path)
    return path


def tiny_overrides(raw: Path, out: Path, *extra: str) -> list[str]:
    """A small, fast Klein autoencoder run on `raw` (16 px digits)."""
    return [
        f"data.raw_dir={raw}",
        "data.resolution=16",
        "data.cache_decoded=true",
        f"output_dir={out}",
        "model.block_out_channels=[8, 16]",
        "model.norm_num_groups=4",
        "train.batch_size=8",
        "train.log_every=1",
        "train.learning_rate=2e-3",
        "lr_scheduler.name=constant",
        "lr_scheduler.warmup_steps=0",
        "tracking.report_to=[jsonl]",
        "stats.fit=false",
        *extra,
    ]
