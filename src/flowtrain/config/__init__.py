"""The run config: pydantic schema plus YAML loading (`extends`, overrides, errors that name their source)."""

from flowtrain.config.load import (
    ConfigError,
    ResolvedConfig,
    config_to_flat_dict,
    dump_config,
    load_config,
    resolve_config,
    save_config,
    validate_config,
)
from flowtrain.config.schema import FlowtrainConfig

__all__ = [
    "ConfigError",
    "FlowtrainConfig",
    "ResolvedConfig",
    "config_to_flat_dict",
    "dump_config",
    "load_config",
    "resolve_config",
    "save_config",
    "validate_config",
]
