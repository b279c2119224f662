"""`flowtrain class-images`: DreamBooth class images for prior preservation, from the base model itself.

Three stages into one folder, each resumable on its own:
  images/   `class-{i:05d}.png` + `.txt` (the class prompt), i < --num-class-images, sampled with the family's
            pipeline (`flowtrain.sample`); image i always uses seed `seed + i`, so a rerun samples only the missing
            ones and gets what an uninterrupted run would have. Each file is written under a temporary name and
            renamed when complete.
  raw/      `flowtrain prepare` of images/ (rebuilt when images/ changed; cheap next to sampling)
  cache/    `flowtrain precompute` of raw/ (continues an unfinished cache)
cache/ is what `dataset.class_cache_dir` points to (see flowtrain.data.prior and configs/klein4b/dreambooth.yaml).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from flowtrain.config.model import ModelOptions

log = logging.getLogger(__name__)


@dataclass
class ClassImages:
    images: Path
    raw: Path
    cache: Path
    sampled: int  # images sampled by this run (the others were there already)


def image_name(i: int) -> str:
    return f"class-{i:05d}.png"


def missing(images: Path, num: int, prompt: str) -> list[int]:
    """Indices below `num` without a finished image and a caption of `prompt` (an image of another class prompt
    counts as missing: it is sampled again)."""
    out = []
    for i in range(num):
        png, txt = images / image_name(i), (images / image_name(i)).with_suffix(".txt")
        if not (png.exists() and txt.exists() and txt.read_text(encoding="utf-8") == prompt):
            out.append(i)
    return out


def sample_class_images(
    images: Path,
    prompt: str,
    num: int,
    model: ModelOptions,
    *,
    resolution: int,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 1,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Sample the missing class images (see the module doc) into `images`; returns how many were sampled."""
    import torch
    from tqdm.auto import tqdm

    from flowtrain.dtypes import torch_dtype
    from flowtrain.models import get_family
    from flowtrain.sample import load_sampling_pipeline

    images.mkdir(parents=True, exist_ok=True)
    todo = missing(images, num, prompt)
    if not todo:
        return 0
    family = get_family(model.family)
    steps = family.sampling_defaults["steps"] if steps is None else steps
    guidance_scale = family.sampling_defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    pipe = load_sampling_pipeline(model, dtype=torch_dtype(model.dtype), device=device)
    bar = tqdm(total=len(todo), desc="class images", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        # Seeded by the image's index, not its place in this run's list: a rerun samples the same image i.
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in chunk]
        out = family.generate(pipe, [prompt] * len(chunk), model, generators=generators, height=resolution,
                              width=resolution, steps=steps, guidance_scale=guidance_scale,
                              output_type="pil")  # fmt: skip
        for i, image in zip(chunk, out, strict=True):
            png = images / image_name(i)
            _write_text(png.with_suffix(".txt"), prompt)
            tmp = png.with_suffix(".png.tmp")
            image.save(tmp, format="PNG")
            tmp.replace(png)  # last: an image is finished only when its caption is in place too
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _check_ours(folder: Path, verb: str) -> None:
    """`folder` is absent, empty, or `verb`'s output (an earlier run of this command): anything else is the user's
    and is neither replaced nor mixed with."""
    from flowtrain.outputs import find_output

    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    found = find_output(folder)
    if found is None or found[0] != verb:
        what = "files flowtrain did not write" if found is None else f"output of `flowtrain {found[0]}`"
        raise FileExistsError(
            f"{folder} holds {what}; class-images writes its own {folder.name}/ there: give another OUT folder"
        )


def class_images(
    out: str | Path,
    prompt: str,
    num: int,
    model: ModelOptions,
    *,
    resolution: int,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 1,
    encode_batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> ClassImages:
    """Sample, prepare and precompute `num` class images of `prompt` into `out` (images/, raw/, cache/)."""
    from flowtrain.chain import raw_is_current
    from flowtrain.data.precompute import precompute
    from flowtrain.data.prepare import prepare

    if num < 1:
        raise ValueError(f"--num-class-images must be at least 1, got {num}")
    if not prompt.strip():
        raise ValueError("--class-prompt is empty: give the class, e.g. 'a photo of a dog'")
    out = Path(out)
    images, raw, cache = out / "images", out / "raw", out / "cache"
    _check_ours(raw, "prepare")  # before sampling: minutes of work lost to a folder problem otherwise
    _check_ours(cache, "precompute")
    sampled = sample_class_images(images, prompt, num, model, resolution=resolution, seed=seed, steps=steps,
                                  guidance_scale=guidance_scale, batch_size=batch_size, device=device,
                                  progress=progress)  # fmt: skip
    extra = sorted(p.name for p in images.glob("class-*.png") if int(p.stem.split("-")[1]) >= num)
    if extra:  # an earlier run asked for more: they stay (the user's images), but the cache holds `num`
        log.warning("%s holds %d class images beyond --num-class-images %d; they are prepared too", images,
                    len(extra), num)  # fmt: skip
    settings = {"resolution": None, "min_size": 16, "keep_duplicates": True}
    current, why = raw_is_current(raw, images, settings)
    if not current:
        log.info("class images: preparing %s (%s)", images, why)
        shutil.rmtree(raw, ignore_errors=True)  # derived from images/ alone (checked above): rebuilt whole
        prepare(images, raw, min_size=16, progress=progress, keep_duplicates=True)
    precompute(raw, cache, model, resolution=resolution, batch_size=encode_batch_size, device=device,
               progress=progress)  # fmt: skip
    return ClassImages(images, raw, cache, sampled)
