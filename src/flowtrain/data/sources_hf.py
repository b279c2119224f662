"""Hugging Face `datasets` as a `prepare` source: a folder written by `save_to_disk`, or `hf-dataset:NAME`.

`NAME` is whatever `datasets.load_dataset` takes: a Hub id (for users with network; it downloads into the HF cache)
or a local folder of data files. Options ride on the source string as a query, so that every verb that takes a
source (`prepare`, `inspect`, `caption`) takes them without new parameters: `hf-dataset:user/pets?split=train&
image=img&caption=text`. The CLI flags `--image-column`, `--caption-column` and `--split` add them for you.

Images are read as stored bytes (the `Image` feature is cast to `decode=False`): decoding is `prepare`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from flowtrain.data.sources import SourceItem, _parquet_item, _UniqueKeys

KIND = "hf-datasets"
PREFIX = "hf-dataset:"
_OPTIONS = ("split", "image", "caption")
_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp")
_CAPTION_COLUMNS = ("caption", "text", "prompt", "txt")
_KEY_COLUMNS = ("key", "id", "__key__")


def split_options(src: str | Path) -> tuple[str, dict[str, str]]:
    """`"name?split=train&image=img"` -> `("name", {"split": "train", "image": "img"})`; unknown options are refused."""
    text = str(src)
    base, _, query = text.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"source {text!r}: unknown option(s) {unknown}; known: {', '.join(_OPTIONS)}")
    return base, options


def with_options(src: str, *, split: str | None = None, image: str | None = None, caption: str | None = None) -> str:
    """`src` with the given options added to its query (the CLI flags' way in); other sources are refused."""
    given = {k: v for k, v in (("split", split), ("image", image), ("caption", caption)) if v is not None}
    if not given:
        return src
    if not matches(src):
        flags = ", ".join(f"--{'split' if k == 'split' else k + '-column'}" for k in given)
        raise ValueError(
            f"{flags} apply to Hugging Face dataset sources only (hf-dataset:NAME or a save_to_disk folder)"
        )
    base, options = split_options(src)
    return f"{base}?{urlencode({**options, **given})}"


def _saved_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def matches(src: str | Path) -> bool:
    base, _, _ = str(src).partition("?")
    return base.startswith(PREFIX) or _saved_folder(Path(base))


def load(src: str | Path) -> tuple[Any, str, str, dict[str, str]]:
    """(dataset, image column, caption column, options). Raises ValueError naming the columns it has."""
    import datasets

    base, options = split_options(src)
    split = options.get("split")
    if base.startswith(PREFIX):
        name = base[len(PREFIX) :]
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"cannot load Hugging Face dataset {name!r} (split {split or 'train'!r}): {exc}") from exc
    else:
        ds = datasets.load_from_disk(base)
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) != 1:
                raise ValueError(f"{base}: holds splits {sorted(ds)}; choose one with --split (or ?split=NAME)")
            if split is not None and split not in ds:
                raise ValueError(f"{base}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split or next(iter(ds))]
    image_col = _column(ds, options.get("image"), _IMAGE_COLUMNS, "image", src)
    caption_col = _column(ds, options.get("caption"), _CAPTION_COLUMNS, "caption", src)
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # bytes as stored: prepare decodes once
    return ds, image_col, caption_col, options


def _column(ds: Any, given: str | None, defaults: tuple[str, ...], what: str, src: str | Path) -> str:
    names = list(ds.column_names)
    if given is not None:
        if given not in names:
            raise ValueError(f"source {str(src)!r}: no {what} column {given!r}; columns are {names}")
        return given
    found = next((c for c in defaults if c in names), None)
    if found is None:
        flag = "--image-column" if what == "image" else "--caption-column"
        raise ValueError(f"source {str(src)!r}: no {what} column among {names}; name it with {flag}")
    return found


def iter_items(src: str | Path) -> Iterator[SourceItem]:
    ds, image_col, caption_col, _ = load(src)  # errors now, not on first next()
    return _iter(ds, image_col, caption_col)


def _iter(ds: Any, image_col: str, caption_col: str) -> Iterator[SourceItem]:
    key_col = next((c for c in _KEY_COLUMNS if c in ds.column_names), None)
    columns = [image_col, caption_col] + ([key_col] if key_col else [])
    base = Path(ds.cache_files[0]["filename"]).parent if ds.cache_files else Path.cwd()
    keys, row = _UniqueKeys(), 0
    # Small batches: embedded images can be megabytes each.
    for batch in ds.select_columns(columns).iter(batch_size=64):
        for i, value in enumerate(batch[image_col]):
            caption = batch[caption_col][i]
            bad_caption = caption is not None and not isinstance(caption, str | bytes)
            image_path, blob, caption, problem = _parquet_item(value, None if bad_caption else caption, base)
            if bad_caption:
                problem = "caption is not a string"
            given = batch[key_col][i] if key_col else None
            key = str(given) if given is not None else f"row{row:08d}"
            yield SourceItem(keys(key), image_path, caption, problem, data=blob, origin=f"row {row}")
            row += 1


def files(src: str | Path) -> list[Path]:
    """The dataset's Arrow files (in the saved folder, or in the HF cache for a loaded name)."""
    return [Path(f["filename"]) for f in load(src)[0].cache_files]


def count(src: str | Path) -> int:
    return len(load(src)[0])
