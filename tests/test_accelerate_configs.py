"""The `accelerate launch --config_file` files we ship (configs/accelerate/) load with accelerate's own reader, and
the FSDP2 one asks for what docs/distributed-fsdp2.md describes (the multi-process tests launch with it)."""

from __future__ import annotations

from pathlib import Path

import pytest

ACCELERATE_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"))


def test_there_are_accelerate_configs():
    assert "fsdp2.yaml" in {p.name for p in ACCELERATE_CONFIGS}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_reads_the_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_machines >= 1 and cfg.num_processes >= 1


def test_fsdp2_config_is_fsdp_version_2_with_sharded_checkpoints():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp2.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # one unit per block (_no_split_modules)
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert cfg.mixed_precision == "bf16"
