"""`flowtrain class-images`: DreamBooth class samples for prior preservation, from the base model itself.

Three stages into one folder, each resumable on its own:
  images/   `class-{i:05d}.png` + `.txt` (the class prompt), i < --num-class-images, sampled with the family's
            pipeline (`flowtrain.sample`); a video family (one whose VAE encodes clips: `clips.is_video_family`)
            samples clips instead, `class-{i:05d}.mp4` of the sampler's `model.num_frames` frames at `model.fps`.
            Sample i always uses seed `seed + i`, so a rerun samples only the missing ones and gets what an
            uninterrupted run would have. Each file is written under a temporary name and renamed when complete.
  images.jsonl  the first --num-class-images samples with their caption: the source of raw/ (samples beyond
            that number, left by an earlier run that asked for more, stay in images/ but out of the cache)
  raw/      `flowtrain prepare` of images.jsonl (rebuilt when it or its files changed; cheap next to sampling)
  cache/    `flowtrain precompute` of raw/ (continues an unfinished cache; rebuilt with raw/); clips are cut as
            `dataset.video` says, the same options as the instance cache's, so that the two caches match
cache/ is what `dataset.class_cache_dir` points to (see flowtrain.data.prior and configs/klein4b/dreambooth.yaml).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowtrain.config.model import ModelOptions
from flowtrain.config.video import VideoConfig

log = logging.getLogger(__name__)


IMAGE, CLIP = ".png", ".mp4"  # a class sample's file suffix: an image family's, a video family's
_NAME = re.compile(r"class-(\d+)$")  # a sample's file stem; its index is the number


@dataclass
class ClassImages:
    images: Path
    raw: Path
    cache: Path
    sampled: int  # samples made by this run (the others were there already)


def sample_name(i: int, suffix: str = IMAGE) -> str:
    """The file name of class sample i: `class-00042.png`, or `.mp4` for a video family's clip."""
    return f"class-{i:05d}{suffix}"


def sample_suffix(family: Any) -> str:
    """The suffix of the family's class samples: a clip (`CLIP`) for a video family, whose sampler returns frames
    and whose cache holds clips, else an image (`IMAGE`)."""
    from flowtrain.data.clips import is_video_family

    return CLIP if is_video_family(family) else IMAGE


def missing(images: Path, num: int, prompt: str, suffix: str = IMAGE) -> list[int]:
    """Indices below `num` without a finished sample (`suffix`) and a caption of `prompt` (a sample of another class
    prompt counts as missing: it is sampled again)."""
    out = []
    for i in range(num):
        path = images / sample_name(i, suffix)
        txt = path.with_suffix(".txt")
        if not (path.exists() and txt.exists() and txt.read_text(encoding="utf-8") == prompt):
            out.append(i)
    return out


def check_clip_length(model: ModelOptions, video: VideoConfig) -> None:
    """A video family's class clips (`model.num_frames` frames at `model.fps`) must be long enough for one clip of
    `video` (`dataset.video`): else precompute would leave every one of them out, after all the sampling. A
    ValueError naming both settings; nothing for options without `num_frames` (an image family)."""
    from flowtrain.data.video import frames_needed
    from flowtrain.media import sample_fps

    frames = getattr(model, "num_frames", None)
    if frames is None:
        return
    need = frames_needed(video.frames, sample_fps(model), video.target_fps)
    if frames < need:
        raise ValueError(
            f"model.num_frames={frames} is too short for dataset.video.frames={video.frames} (the clip needs {need} "
            "sampled frames): give the dataset.video options the instance cache was precomputed with, or sample "
            "longer clips"
        )


def write_sample(sample: Any, path: Path, fps: int) -> None:
    """Write one sampled image (PIL) as PNG, or one clip (a list of PIL frames, `media.is_video`) as a video of
    `path`'s suffix at `fps` (PyAV, `video.write_video`), under a temporary name renamed when complete."""
    import numpy as np

    from flowtrain.data.video import write_video
    from flowtrain.media import is_video

    tmp = path.with_suffix(path.suffix + ".tmp")
    if is_video(sample):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in sample])  # (F, H, W, 3) uint8
        write_video(tmp, frames, fps=fps, suffix=path.suffix)
    else:
        sample.save(tmp, format="PNG")
    tmp.replace(path)


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
    """Sample the missing class samples (see the module doc) into `images`; returns how many were sampled."""
    import torch
    from tqdm.auto import tqdm

    from flowtrain.dtypes import torch_dtype
    from flowtrain.media import sample_fps
    from flowtrain.models import get_family
    from flowtrain.sample import load_sampling_pipeline

    family = get_family(model.family)
    suffix = sample_suffix(family)
    images.mkdir(parents=True, exist_ok=True)
    todo = missing(images, num, prompt, suffix)
    if not todo:
        return 0
    steps = family.sampling_defaults["steps"] if steps is None else steps
    guidance_scale = family.sampling_defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    pipe = load_sampling_pipeline(model, dtype=torch_dtype(model.dtype), device=device)
    unit = "clip" if suffix == CLIP else "img"
    bar = tqdm(total=len(todo), desc="class samples", unit=unit, disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        # Seeded by the image's index, not its place in this run's list: a rerun samples the same image i.
        generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in chunk]
        out = family.generate(pipe, [prompt] * len(chunk), model, generators=generators, height=resolution,
                              width=resolution, steps=steps, guidance_scale=guidance_scale,
                              output_type="pil")  # fmt: skip
        for i, sample in zip(chunk, out, strict=True):
            path = images / sample_name(i, suffix)
            _write_text(path.with_suffix(".txt"), prompt)
            write_sample(sample, path, sample_fps(model))  # last: a sample is finished only with its caption
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_listing(listing: Path, images: Path, num: int, prompt: str, suffix: str) -> Path:
    """`listing` (JSONL): samples 0..num-1 of `images` with their key and caption, the source `prepare` reads, so
    that raw/ and the cache hold exactly `num` samples whatever else images/ holds. Rewritten only when its content
    changes: its modification time is part of the source signature that says whether raw/ is current."""
    rel = images.relative_to(listing.parent).as_posix()
    lines = [
        json.dumps({"key": Path(name).stem, "image": f"{rel}/{name}", "caption": prompt}, ensure_ascii=False)
        for name in (sample_name(i, suffix) for i in range(num))
    ]
    text = "".join(line + "\n" for line in lines)
    if not listing.exists() or listing.read_text(encoding="utf-8") != text:
        _write_text(listing, text)
    return listing


def extra_samples(images: Path, num: int, suffix: str) -> list[str]:
    """Names of the samples in `images` numbered `num` or more (an earlier run asked for more)."""
    return sorted(p.name for p in images.glob(f"class-*{suffix}") if (m := _NAME.match(p.stem)) and int(m[1]) >= num)


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
    video: VideoConfig | None = None,
) -> ClassImages:
    """Sample, prepare and precompute `num` class samples of `prompt` into `out` (images/, images.jsonl, raw/,
    cache/). `video`: how precompute cuts a video family's clips (`dataset.video`; default `VideoConfig()`, as
    `flowtrain precompute`'s), which must be the instance cache's for prior preservation to accept the cache."""
    from flowtrain.chain import raw_is_current
    from flowtrain.data.precompute import precompute
    from flowtrain.data.prepare import prepare
    from flowtrain.models import get_family

    if num < 1:
        raise ValueError(f"--num-class-images must be at least 1, got {num}")
    if not prompt.strip():
        raise ValueError("--class-prompt is empty: give the class, e.g. 'a photo of a dog'")
    video = video or VideoConfig()
    suffix = sample_suffix(get_family(model.family))
    if suffix == CLIP:
        check_clip_length(model, video)
    out = Path(out)
    images, raw, cache = out / "images", out / "raw", out / "cache"
    _check_ours(raw, "prepare")  # before sampling: minutes of work lost to a folder problem otherwise
    _check_ours(cache, "precompute")
    sampled = sample_class_images(images, prompt, num, model, resolution=resolution, seed=seed, steps=steps,
                                  guidance_scale=guidance_scale, batch_size=batch_size, device=device,
                                  progress=progress)  # fmt: skip
    extra = extra_samples(images, num, suffix)
    if extra:  # an earlier run asked for more: they stay (the user's files), but the cache holds `num`
        log.warning("%s holds %d class samples beyond --num-class-images %d (%s, ...); they stay there but are left "
                    "out of the cache", images, len(extra), num, extra[0])  # fmt: skip
    listing = write_listing(out / "images.jsonl", images, num, prompt, suffix)
    settings = {"resolution": None, "min_size": 16, "keep_duplicates": True}
    current, why = raw_is_current(raw, listing, settings)
    if not current:
        log.info("class samples: preparing %s (%s)", listing, why)
        shutil.rmtree(raw, ignore_errors=True)  # derived from the listing alone (checked above): rebuilt whole
        # So is the cache: precompute reuses a shard by its keys, and a resampled sample (another class prompt)
        # keeps its key, so shards encoded from the old samples would pass for the new ones.
        shutil.rmtree(cache, ignore_errors=True)
        prepare(listing, raw, min_size=16, progress=progress, keep_duplicates=True)
    precompute(raw, cache, model, resolution=resolution, batch_size=encode_batch_size, device=device,
               progress=progress, video=video)  # fmt: skip
    return ClassImages(images, raw, cache, sampled)
