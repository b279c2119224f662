"""docs/training.md documents every config option with its default, and the shipped recipes it lists exist and
hold what it says they do."""

from __future__ import annotations

from pathlib import Path

from flowtrain.config import load_config
from flowtrain.config.reference import BEGIN, END, markdown, option_rows

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "training.md"
FIX = "regenerate it: python -m flowtrain.config.reference --write docs/training.md"


def test_every_option_is_documented_with_its_default():
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"docs/training.md has no option reference block; {FIX}"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    missing = [key for key, _, default, _ in option_rows() if f"| `{key}` |" not in block]
    assert not missing, f"options missing from docs/training.md: {missing}; {FIX}"
    stale = [
        key for key, _, default, _ in option_rows()
        if f"| `{key}` |" in block and f"| `{default}` |" not in block.split(f"| `{key}` |", 1)[1].split("\n", 1)[0]
    ]  # fmt: skip
    assert not stale, f"docs/training.md shows old defaults for {stale}; {FIX}"


def test_reference_lists_every_leaf_option():
    keys = [k for k, *_ in option_rows()]
    assert len(keys) == len(set(keys))
    for key in ("loss.prior_loss_weight", "optimizer.lr_scale", "lr_scheduler.patience", "ema.decay",
                "timesteps.shift_mode", "train.deterministic", "dataset.class_cache_dir", "train_mode"):  # fmt: skip
        assert key in keys
    assert "| `ema.device` | `accelerator` \\| `cpu` | `accelerator` |" in markdown()


def test_shipped_recipes():
    prodigy = load_config(ROOT / "configs/klein4b/lora_prodigy.yaml")
    assert prodigy.optimizer.name == "prodigy" and prodigy.train.learning_rate == 1.0 and prodigy.train_mode == "lora"
    full = load_config(ROOT / "configs/klein4b/full_adamw8bit_ema.yaml")
    assert full.train_mode == "full" and full.optimizer.name == "adamw8bit" and full.ema.enabled
    assert full.train.mixed_precision == "bf16"
    db = load_config(ROOT / "configs/klein4b/dreambooth.yaml")
    assert db.loss.name == "prior_preservation" and db.dataset.class_cache_dir
    text = DOC.read_text()
    for name in ("lora_prodigy.yaml", "full_adamw8bit_ema.yaml", "dreambooth.yaml"):
        assert f"configs/klein4b/{name}" in text
