"""docs/autoencoder.md carries the generated option reference, up to date, and every option with its default."""

from __future__ import annotations

from flowtrain.autoencoder.config import AutoencoderConfig
from flowtrain.autoencoder.reference import markdown
from flowtrain.config.reference import option_rows

from .conftest import REPO


def test_docs_autoencoder_md_holds_the_generated_reference():
    text = (REPO / "docs/autoencoder.md").read_text()
    assert markdown() in text, "run: python -m flowtrain.autoencoder.reference --write docs/autoencoder.md"
    rows = option_rows(AutoencoderConfig)
    assert {"loss.free_bits", "gan.r1_weight", "gan.only", "perceptual.model", "ema.decay", "samples.every_steps",
            "checkpointing.every_steps"} <= {r[0] for r in rows}  # fmt: skip
    for key, _, default, _ in rows:
        assert f"| `{key}` |" in text and f"| `{default}` |" in text
