"""One tiny FLUX.1 pipeline folder for this folder's tests (built offline, once), its encoders and some images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = ["a photo of a dog", "a red square on a white background", "an oil painting of a lighthouse"]


@pytest.fixture(scope="session")
def captions() -> list[str]:
    return list(CAPTIONS)


@pytest.fixture(scope="session")
def flux1_dir(tmp_path_factory) -> Path:
    from flowtrain.models import get_family

    return get_family("flux1").save_tiny_pipeline(tmp_path_factory.mktemp("flux1") / "pipeline")


@pytest.fixture(scope="session")
def opts(flux1_dir):
    from flowtrain.models import get_family
    from flowtrain.models.flux1 import Options

    return Options(pretrained=str(flux1_dir), dtype="float32", **get_family("flux1").tiny_options)


@pytest.fixture(scope="session")
def encoders(opts):
    import torch

    from flowtrain.models import get_family

    return get_family("flux1").load_encoders(opts, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def images():
    """Three smooth random RGB images, 48×48 (square: the pipeline's default and crop resizes agree on them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in CAPTIONS:
        coarse = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
        out.append(Image.fromarray(coarse).resize((48, 48), Image.Resampling.BICUBIC))
    return out


@pytest.fixture(scope="session")
def cached_batch(encoders, opts, images):
    """What precompute would store for CAPTIONS / images at the tiny resolution, cast to the declared columns."""
    from flowtrain.models import get_family

    fam = get_family("flux1")
    res = fam.tiny_resolution
    cols = {c.name: c for c in fam.cache_columns(encoders, opts, resolution=res)}
    row = {**fam.encode_prompts(encoders, CAPTIONS, opts)}
    row.update(fam.encode_pixels(encoders, fam.preprocess_images(encoders, images, resolution=res)))
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert set(row) == set(cols)
    for name, col in cols.items():
        assert tuple(row[name].shape[1:]) == col.shape, name
        row[name] = row[name].to(dtypes[col.dtype])
    return row
