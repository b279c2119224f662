"""Session fixtures: one tiny Klein pipeline folder and one small latent cache, built offline once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from flowtrain.models.flux2_klein.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_pipeline_dir) -> tuple[Path, Path]:
    """(raw_dir, cache_dir): 8 images prepared and precomputed at 32 px, text embeddings in float32."""
    from flowtrain.testing.data import make_tiny_cache

    return make_tiny_cache(tmp_path_factory.mktemp("data"), tiny_pipeline_dir)


@pytest.fixture(autouse=True)
def _cli_logging_does_not_leak():
    """`flowtrain.cli.main` configures the root logger (`basicConfig(force=True)`) with a handler on the current
    sys.stderr, which under capsys is that test's capture stream. A later test that logs at that level would
    write into the closed stream and print "--- Logging error ---" with a traceback into its own stderr. So the
    root logger is put back after every test (pytest's own handlers are subclasses and stay)."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)
