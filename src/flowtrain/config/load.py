"""Load a `FlowtrainConfig` from YAML: `extends` inheritance, dotted overrides, and errors that name their source.

Every leaf value remembers the file (or command-line override) that set it last, so a validation error points at
the file to edit rather than at the merged dict the user never wrote.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from flowtrain.config.schema import FlowtrainConfig

OVERRIDE_SOURCE = "command line override"
EXTENDS_KEY = "extends"

Provenance = dict[str, str]
M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be loaded or validated; the message is written for the user, one problem a line."""


# YAML 1.1 reads only `1.0e-4` (dot and signed exponent) as a float, so `1e-4` would stay the string "1e-4" and
# fail a float field. Loader and dumper share the rule, so a dumped string such as "1e5" gets quoted.
_SCI_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float and rejects duplicate keys (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key_node.value!r}",
                    key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes tuples as lists and quotes strings the loader would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(_FLOAT_TAG, _SCI_FLOAT, list("-+0123456789."))
_Dumper.add_representer(tuple, lambda dumper, data: dumper.represent_list(list(data)))


@dataclass
class ResolvedConfig:
    """The merged raw mapping (after `extends` and overrides, before validation) and where each key came from."""

    path: Path
    data: dict[str, Any]
    provenance: Provenance


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> FlowtrainConfig:
    """Read `path` (following `extends`), apply `key.path=value` overrides, and validate."""
    return validate_config(resolve_config(path, overrides), FlowtrainConfig)


def validate_config(resolved: ResolvedConfig, schema: type[M]) -> M:
    """Validate a resolved mapping against any pydantic `schema` (the training config, or another verb's own,
    e.g. an autoencoder config), with the same file-and-key error messages."""
    try:
        return schema.model_validate(resolved.data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, resolved, schema)) from exc


def resolve_config(path: str | Path, overrides: Sequence[str] = ()) -> ResolvedConfig:
    """Merge `path` with its bases and the overrides, without validating; keeps per-key provenance."""
    top = Path(path)
    data, provenance = _resolve_file(top, chain=(), extended_from=None)
    for text in overrides:
        _apply_override(data, provenance, text)
    return ResolvedConfig(top, data, provenance)


def resolve_mapping(
    data: dict[str, Any], overrides: Sequence[str] = (), source: str = "command line"
) -> ResolvedConfig:
    """Like `resolve_config`, for a mapping built in code (e.g. from a verb's flags) instead of a file."""
    data = json.loads(json.dumps(data))  # a private deep copy
    provenance = _leaf_provenance(data, source)
    for text in overrides:
        _apply_override(data, provenance, text)
    return ResolvedConfig(Path(f"<{source}>"), data, provenance)


def _resolve_file(path: Path, chain: tuple[Path, ...], extended_from: Path | None) -> tuple[dict, Provenance]:
    """Resolve one file on its own (its bases first, then itself), so bases merge as whole resolved configs."""
    if any(p.resolve() == path.resolve() for p in chain):
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"`extends` cycle: {cycle}")
    raw = _read_yaml(path, extended_from)
    data: dict = {}
    provenance: Provenance = {}
    for base in _pop_extends(raw, path):
        base_data, base_prov = _resolve_file(path.parent / base, (*chain, path), path)
        _merge(data, provenance, base_data, base_prov)
    _merge(data, provenance, raw, _leaf_provenance(raw, str(path)))
    return data, provenance


def _read_yaml(path: Path, extended_from: Path | None) -> dict:
    """Parse one file into a mapping; an empty file is an empty mapping."""
    via = f" (extended from {extended_from})" if extended_from else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}{via}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}{via}: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {exc.problem}{context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def _pop_extends(raw: dict, path: Path) -> list[str]:
    """Remove and return the `extends` entry as a list of paths (relative to `path`'s folder)."""
    bases = raw.pop(EXTENDS_KEY, None)
    if bases is None:
        return []
    if isinstance(bases, str):
        return [bases]
    if isinstance(bases, list) and all(isinstance(b, str) for b in bases):
        return bases
    raise ConfigError(f"{path}: `{EXTENDS_KEY}` must be a file path or a list of file paths, got {bases!r}")


def _leaf_provenance(data: Any, source: str, prefix: str = "") -> Provenance:
    """Attribute every leaf (anything but a non-empty mapping) under `data` to `source`."""
    if isinstance(data, dict) and data:
        out: Provenance = {}
        for key, value in data.items():
            out.update(_leaf_provenance(value, source, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): source} if prefix else {}


def _merge(dst: dict, dst_prov: Provenance, src: dict, src_prov: Provenance, prefix: str = "") -> None:
    """Deep-merge `src` into `dst`: mappings merge key by key, anything else (lists included) replaces."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            dst[key] = dict(dst[key])  # copy before mutating: a YAML alias may share this mapping with another key
            _merge(dst[key], dst_prov, value, src_prov, dotted + ".")
            continue
        # A replaced value takes its provenance wholesale: nothing under it still comes from `dst`'s sources.
        dst[key] = value
        for stale in [k for k in dst_prov if _is_under(k, dotted)]:
            del dst_prov[stale]
        dst_prov.update({k: v for k, v in src_prov.items() if _is_under(k, dotted)})


def _is_under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _apply_override(data: dict, provenance: Provenance, text: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (`null`, `[a, b]`, `3e-4`)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"malformed override `{text}`: expected `dotted.key=value`, e.g. `train.learning_rate=3e-4`")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override `{text}`: the value is not valid YAML: {exc}") from exc
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        node = node.get(part, {})
        if not isinstance(node, dict):
            parent = ".".join(parts[: depth + 1])
            raise ConfigError(f"override `{text}`: `{parent}` is {node!r}, not a mapping, so `{key}` cannot be set")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    _merge(data, provenance, nested, _leaf_provenance(nested, OVERRIDE_SOURCE))


def _format_validation_error(
    exc: ValidationError, resolved: ResolvedConfig, root: type[BaseModel] = FlowtrainConfig
) -> str:
    """One line per problem: source file, dotted key, what is wrong."""
    grouped: dict[tuple[str, str], list[dict]] = {}  # pydantic reports each union member separately; merge them
    for err in exc.errors():
        path, absent = _data_path(err, resolved.data)
        key = ".".join(str(p) for p in path) or "<top level>"
        source = str(resolved.path) if absent else _source_of(path, resolved)
        grouped.setdefault((source, key), []).append({**err, "path": path, "absent": absent})
    lines = [f"invalid config {resolved.path}: {len(grouped)} problem(s)"]
    lines += [f"  - {source}: {key}: {_describe(errs, root, resolved.data)}" for (source, key), errs in grouped.items()]
    return "\n".join(lines)


def _data_path(err: dict, data: dict) -> tuple[tuple[Any, ...], bool]:
    """Map a pydantic `loc` onto keys present in the data, dropping union-member tags such as `list[str]`."""
    path: list[Any] = []
    node: Any = data
    tags = _union_tags()
    for part in err["loc"]:
        if tuple(path) == ("model",) and part in tags and not _contains(node, part):
            continue  # the family tag pydantic puts in the location of a `model:` error
        if _contains(node, part):
            node = node[part]
        elif err["type"] == "missing" and isinstance(node, dict):
            return (*path, part), True
        else:
            continue
        path.append(part)
    return tuple(path), False


def _union_tags() -> set[str]:
    from flowtrain.models import family_names

    return set(family_names())


def _contains(node: Any, part: Any) -> bool:
    if isinstance(node, list):
        return isinstance(part, int) and 0 <= part < len(node)
    return isinstance(node, dict) and part in node


def _source_of(path: tuple[Any, ...], resolved: ResolvedConfig) -> str:
    """The source of the longest prefix of `path` with known provenance (list items belong to their list)."""
    for end in range(len(path), 0, -1):
        source = resolved.provenance.get(".".join(str(p) for p in path[:end]))
        if source is not None:
            return source
    return str(resolved.path)


def _describe(errs: list[dict], root: type[BaseModel], data: dict | None = None) -> str:
    """Human wording for the errors of one key."""
    first = errs[0]
    path = first["path"]
    dotted = ".".join(str(p) for p in path)
    if first["type"] == "extra_forbidden":
        return "unknown key; " + _suggest(path, root, data)
    if first["type"] == "union_tag_invalid":  # the `model:` section names no registered family
        ctx = first.get("ctx", {})
        return f"unknown model family {ctx.get('tag')!r} (model.family); known families: {ctx.get('expected_tags')}"
    field = _field_at(path, root, data)
    if first["absent"]:
        return _describe_missing(dotted, field)
    # pydantic prefixes a validator's own message with "Value error, "; the message is already the user's
    message = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errs))
    details = []
    if field is not None and any(e["type"].endswith(("_type", "_parsing", "missing")) for e in errs):
        details.append(f"expected {_type_name(field.annotation)}")
    details.append(f"got {_short_repr(first['input'])}")
    return f"{message} ({', '.join(details)})"


def _describe_missing(dotted: str, field: FieldInfo | None) -> str:
    section = field.annotation if field else None
    members = _union_members(section) if typing.get_origin(section) in (typing.Union, types.UnionType) else []
    if members:  # a union of sections (`model:`): the keys every member requires
        required = [f"`{dotted}.{n}`" for n, f in members[0].model_fields.items()
                    if all(n in m.model_fields and m.model_fields[n].is_required() for m in members)]  # fmt: skip
        return f"required section is missing; set {', '.join(required) or f'`{dotted}`'}"
    if isinstance(section, type) and issubclass(section, BaseModel):
        required = [f"`{dotted}.{name}`" for name, f in section.model_fields.items() if f.is_required()]
        return f"required section is missing; set {', '.join(required) or f'`{dotted}`'}"
    hint = f" ({field.description.rstrip('.')})" if field and field.description else ""
    return f"required value is missing{hint}; set it in the file or override with `{dotted}=...`"


def _suggest(path: tuple[Any, ...], root: type[BaseModel], data: dict | None = None) -> str:
    """`did you mean` the closest valid key at that level, or else list the valid keys."""
    model = _model_at(path[:-1], root, data)
    if model is None:
        return "this section takes no extra keys"
    valid = list(model.model_fields)
    prefix = "".join(f"{p}." for p in path[:-1])
    close = difflib.get_close_matches(str(path[-1]), valid, n=1)
    if close:
        return f"did you mean `{prefix}{close[0]}`?"
    where = f"`{prefix.rstrip('.')}`" if prefix else "the top level"
    return f"valid keys at {where}: {', '.join(valid)}"


def _model_at(
    parts: Sequence[Any], root: type[BaseModel] = FlowtrainConfig, data: dict | None = None
) -> type[BaseModel] | None:
    """The schema section at `parts` (empty: the root), or None when `parts` leaves the schema's sections. A section
    that is a union of models (`model:`, one class per family) resolves to the member for the data's family."""
    model: type[BaseModel] = root
    node: Any = data
    for part in parts:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        node = node.get(part) if isinstance(node, dict) else None
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = _union_member(annotation, node)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _union_members(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [typing.get_args(m)[0] if typing.get_origin(m) is typing.Annotated else m for m in args]


def _union_member(annotation: Any, node: Any) -> Any:
    """The member of a union of models whose `family` default is the data's family (detected when not set)."""
    members = _union_members(annotation)
    family = node.get("family") if isinstance(node, dict) else None
    if family is None and isinstance(node, dict):
        from flowtrain.config.schema import resolve_family

        try:
            family = resolve_family(node).get("family")
        except ValueError:
            family = None
    for m in members:
        f = getattr(m, "model_fields", {}).get("family")
        if f is not None and f.default == family:
            return m
    return None


def _field_at(
    path: Sequence[Any], root: type[BaseModel] = FlowtrainConfig, data: dict | None = None
) -> FieldInfo | None:
    model = _model_at(path[:-1], root, data) if path else None
    return model.model_fields.get(path[-1]) if model else None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping"
    name = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    return f"`{name}`"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dump_yaml(data: Any) -> str:
    """YAML text that `load_config` reads back to the same values (tuples as lists, float-like strings quoted)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_config(cfg: FlowtrainConfig) -> str:
    """YAML for `cfg`: top-level scalars first, then sections, each in schema order, then lists of sections (a
    pipeline's `stages`); loads back to an equal config."""
    data = cfg.model_dump(mode="python")
    ordered = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    ordered.update({k: v for k, v in data.items() if isinstance(v, dict)})
    ordered.update({k: v for k, v in data.items() if isinstance(v, list)})
    return dump_yaml(ordered)


def save_config(cfg: FlowtrainConfig, path: str | Path) -> None:
    """Write `dump_config(cfg)` to `path`, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg), encoding="utf-8")


def config_to_flat_dict(cfg: FlowtrainConfig) -> dict[str, str | int | float | bool | None]:
    """Dotted keys to scalars (lists and dicts as JSON text), e.g. for MLflow params."""
    flat: dict[str, str | int | float | bool | None] = {}
    _flatten(cfg.model_dump(mode="python"), "", flat)
    return flat


def _flatten(value: Any, key: str, out: dict[str, str | int | float | bool | None]) -> None:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        for sub, item in value.items():
            _flatten(item, f"{key}.{sub}" if key else sub, out)
    elif isinstance(value, (dict, list, tuple)):
        out[key] = json.dumps(value, default=str)
    else:
        out[key] = value
