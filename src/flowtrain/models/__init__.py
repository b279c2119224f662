"""Model families. Each is one package under `flowtrain/models/` (see `base.ModelFamily` for what it owns).

Registering a family is one line in `FAMILY_PACKAGES`. A family package's `__init__` stays torch-free and exposes
`Options` (its `model:` config section), `PIPELINE_CLASSES` (the `model_index.json` class names that mean it) and
`load_family()` (the `ModelFamily` object, imported on first use; not named `family`, which the
submodule `family.py` would shadow).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from flowtrain.models.base import (
    Column,
    ExportsOriginal,
    ModelFamily,
    ModelPathError,
    RestrictsTimesteps,
    TrainsAutoencoder,
)

if TYPE_CHECKING:
    from flowtrain.config.model import ModelOptions

FAMILY_PACKAGES: dict[str, str] = {
    "flux1": "flowtrain.models.flux1",
    "flux2_klein": "flowtrain.models.flux2_klein",
    "qwen_image": "flowtrain.models.qwen_image",
    "wan": "flowtrain.models.wan",
}


class UnknownFamilyError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def family_names() -> list[str]:
    return sorted(FAMILY_PACKAGES)


def _package(name: str) -> ModuleType:
    if name not in FAMILY_PACKAGES:
        raise UnknownFamilyError(
            f"unknown model family {name!r}; known families: {', '.join(family_names())} (model.family)"
        )
    return importlib.import_module(FAMILY_PACKAGES[name])


@functools.cache
def get_family(name: str) -> ModelFamily:
    """The `ModelFamily` registered as `name` (one shared, stateless instance)."""
    return _package(name).load_family()


def autoencoder_family(name: str | None) -> TrainsAutoencoder:
    """The family that trains the autoencoder of an autoencoder config (`family:`; when not set, the one family
    that trains autoencoders)."""
    able = [n for n in family_names() if isinstance(get_family(n), TrainsAutoencoder)]
    if name is None and len(able) == 1:
        name = able[0]
    if name is None or name not in able:
        what = "no `family:` is set" if name is None else f"family {name!r} does not train autoencoders"
        raise ValueError(f"autoencoder config: {what}; set `family:` to one of {', '.join(able)}")
    return get_family(name)  # type: ignore[return-value]


def family_options() -> dict[str, type[ModelOptions]]:
    """{family name: its `model:` options class}, torch-free (for the config schema)."""
    return {name: _package(name).Options for name in family_names()}


def family_of_pipeline(class_name: str) -> str | None:
    """The family whose pipeline class is `class_name` (model_index.json `_class_name`), if any."""
    for name in family_names():
        if class_name in _package(name).PIPELINE_CLASSES:
            return name
    return None


def detect_family(
    pretrained: str, revision: str | None = None, *, download: bool = False
) -> tuple[str | None, str | None]:
    """(family, pipeline class name) from `pretrained`'s model_index.json; (None, class) for a pipeline class no
    family handles, (None, None) when the file cannot be read (a hub id: only from the local cache unless
    `download`)."""
    from flowtrain.models.paths import read_model_index

    index = read_model_index(pretrained, revision, download=download)
    if not index or "_class_name" not in index:
        return None, None
    return family_of_pipeline(index["_class_name"]), index["_class_name"]


__all__ = [
    "FAMILY_PACKAGES",
    "Column",
    "ExportsOriginal",
    "ModelFamily",
    "ModelPathError",
    "RestrictsTimesteps",
    "TrainsAutoencoder",
    "UnknownFamilyError",
    "autoencoder_family",
    "detect_family",
    "family_names",
    "family_of_pipeline",
    "family_options",
    "get_family",
]
