"""The run config: pydantic schema plus YAML loading (`extends`, overrides, errors that name their source).

Names are imported on first use: `config.section` and `config.model` must be importable by the model families,
whose options the schema itself is built from.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "flowtrain.config.load",
    "ResolvedConfig": "flowtrain.config.load",
    "config_to_flat_dict": "flowtrain.config.load",
    "dump_config": "flowtrain.config.load",
    "dump_yaml": "flowtrain.config.load",
    "load_config": "flowtrain.config.load",
    "resolve_config": "flowtrain.config.load",
    "resolve_mapping": "flowtrain.config.load",
    "save_config": "flowtrain.config.load",
    "validate_config": "flowtrain.config.load",
    "FlowtrainConfig": "flowtrain.config.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowtrain.config' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
