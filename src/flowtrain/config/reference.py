"""The option reference of docs/training.md, generated from the schema (field types, defaults, descriptions).

    python -m flowtrain.config.reference            # print the Markdown
    python -m flowtrain.config.reference --write docs/training.md   # refresh the block between the markers

tests/config/test_reference.py checks that docs/training.md mentions every option with its default.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from flowtrain.config.schema import FlowtrainConfig

BEGIN = "<!-- BEGIN CONFIG REFERENCE (python -m flowtrain.config.reference --write docs/training.md) -->"
END = "<!-- END CONFIG REFERENCE -->"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def default_text(field: Any) -> str:
    """The default as YAML-ish text: `required` when there is none."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, BaseModel):
        return "(section)"
    return str(value)


def type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if origin is None else None
    if origin is list and all(isinstance(a, type) for a in typing.get_args(annotation)):  # list[StageConfig]
        text = f"list[{', '.join(a.__name__ for a in typing.get_args(annotation))}]"
    return text or str(annotation).replace("typing.", "").replace("|", "\\|")


def option_rows(model: type[BaseModel] = FlowtrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every leaf option, sections expanded in schema order. The
    `model:` section lists the keys every family has; each family's own keys are in its docs/models/ page
    (`family_option_rows`)."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if model is FlowtrainConfig and name == "model":
            rows += _generic_model_rows()
        elif _is_section(field.annotation):
            rows += option_rows(field.annotation, f"{key}.")
        else:
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            rows.append((key, type_text(field.annotation), default_text(field), desc))
    return rows


def _generic_model_rows() -> list[tuple[str, str, str, str]]:
    from flowtrain.config.model import ModelOptions
    from flowtrain.models import family_names

    rows = option_rows(ModelOptions, "model.")
    families = " \\| ".join(f"`{n}`" for n in family_names())
    return [(k, families, "detected", d) if k == "model.family" else (k, t, v, d) for k, t, v, d in rows]


def family_option_rows(family: str) -> list[tuple[str, str, str, str]]:
    """The `model:` keys a family adds to the generic ones (`model.family` itself excluded)."""
    from flowtrain.config.model import ModelOptions
    from flowtrain.models import family_options

    generic = set(ModelOptions.model_fields)
    return [r for r in option_rows(family_options()[family], "model.") if r[0].split(".", 1)[1] not in generic]


def markdown() -> str:
    """One table per top-level section (top-level scalars first)."""
    rows = option_rows()
    sections: dict[str, list] = {"": []}  # top-level options first
    for row in rows:
        sections.setdefault(row[0].split(".")[0] if "." in row[0] else "", []).append(row)
    out = [BEGIN, ""]
    for section, items in sections.items():
        annotation = FlowtrainConfig.model_fields[section].annotation if section else None
        doc = annotation.__doc__ if _is_section(annotation) else None
        if section == "model":
            doc = "The keys every model family has; each family adds its own (docs/models.md)."
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
        tail = rest.split(END, 1)[1]
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write(sys.argv[2])
    else:
        sys.stdout.write(markdown())
