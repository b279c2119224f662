"""docs/autoencoder.md's option reference, generated from `AutoencoderConfig` with the training config's table
writer (`flowtrain.config.reference`):

    python -m flowtrain.autoencoder.reference                              # print the Markdown
    python -m flowtrain.autoencoder.reference --write docs/autoencoder.md  # refresh the block between the markers

tests/autoencoder/test_docs.py checks that the file holds exactly what this generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flowtrain.autoencoder.config import AutoencoderConfig
from flowtrain.config.reference import _is_section, option_rows

BEGIN = "<!-- BEGIN AUTOENCODER REFERENCE (python -m flowtrain.autoencoder.reference --write docs/autoencoder.md) -->"
END = "<!-- END AUTOENCODER REFERENCE -->"


def markdown() -> str:
    """One table per section of the autoencoder config (top-level keys first)."""
    sections: dict[str, list] = {"": []}
    for row in option_rows(AutoencoderConfig):
        sections.setdefault(row[0].split(".")[0] if "." in row[0] else "", []).append(row)
    out = [BEGIN, ""]
    for section, items in sections.items():
        annotation = AutoencoderConfig.model_fields[section].annotation if section else None
        doc = annotation.__doc__ if _is_section(annotation) else None
        out.append(f"### `{section}`" if section else "### top level")
        if doc and not doc.startswith(("Usage docs", "!!!")):
            out += ["", " ".join(doc.split())]
        out += ["", "| option | type | default | description |", "|---|---|---|---|"]
        out += [f"| `{k}` | {t} | `{d}` | {desc} |" for k, t, d, desc in items]
        out.append("")
    out.append(END)
    return "\n".join(out) + "\n"


def write(path: str | Path) -> None:
    """Replace the block between BEGIN and END in `path` (append it when the markers are missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = markdown()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write(sys.argv[2])
    else:
        sys.stdout.write(markdown())
