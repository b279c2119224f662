"""`flowtrain <verb>`: parse arguments, load config, call one function per verb.

Heavy libraries (torch, diffusers) are imported inside the verbs so `flowtrain --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from flowtrain.openmp import choose_wait_policy

EXIT_USER_ERROR = 2
EXPORT_FORMATS = ("diffusers", "comfyui", "original")  # flowtrain.export.FORMATS, without importing it for --help
PRECOMPUTE_RESOLUTION = 512  # `precompute --resolution`'s default, and `train --from`'s
# OSErrors that come from a path the user gave (an --out under a file, an unwritable folder), not from the machine
_PATH_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def _setup_logging(quiet: bool) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    level = logging.WARNING if (quiet or rank != 0) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", force=True)
    for noisy in ("httpx", "urllib3", "diffusers", "transformers", "accelerate", "peft", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _positive_int(text: str) -> int:
    """For counts and sizes where 0 or less has no meaning: refused by argparse (exit 2) naming the flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _sides(text: str) -> list[int]:
    """`--bucket-sides S1,S2`: positive integers, comma-separated."""
    return [_positive_int(x) for x in text.split(",") if x]


def _path(text: str) -> str:
    """A path flag: an empty string would mean the current folder (or be ignored), never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def _device(text: str) -> str:
    """A device this machine has: `--device cuda` on a CPU-only machine used to fail after the model had loaded,
    with a traceback. torch is imported only when the flag is given."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device ({e})") from None
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    count = backend.device_count() if backend is not None and hasattr(backend, "device_count") else None
    if dev.type != "cpu" and not count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no {dev.type} device")
    if count and dev.index is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {dev.type} device(s)")
    return text


def _is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun sets RANK), or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------------- verbs
def cmd_prepare(args: argparse.Namespace) -> int:
    from flowtrain.data.fs import is_url
    from flowtrain.data.prepare import prepare, summary
    from flowtrain.outputs import output_slot

    src = _source(args)
    options = dict(resolution=args.resolution, shard_size=args.shard_size, min_size=args.min_size,
                   progress=not args.quiet, keep_duplicates=args.keep_duplicates,
                   min_frames=args.min_frames)  # fmt: skip
    if is_url(args.out):  # object storage: staged locally, uploaded when complete (flowtrain.data.remote)
        from flowtrain.data.remote import prepare_to_url

        report = prepare_to_url(src, args.out, overwrite=args.overwrite, **options)
    else:
        with output_slot(args.out, "prepare", flag="--out", overwrite=args.overwrite):
            report = prepare(src, args.out, **options)
    if args.quiet:  # otherwise prepare() has printed the summary, with the skip reasons
        print(summary(report, args.out, keep_duplicates=args.keep_duplicates))
    return 0


def _source(args: argparse.Namespace) -> str:
    """SRC with the HF dataset options of `_source_flags` folded into it (flowtrain.data.sources_hf)."""
    from flowtrain.data.sources_hf import with_options

    return with_options(args.src, split=args.split, image=args.image_column, caption=args.caption_column)


def _source_flags(parser: argparse.ArgumentParser) -> None:
    """SRC, and the options of a Hugging Face dataset source, for every verb that reads a source."""
    parser.add_argument(
        "src",
        type=_path,
        help="folder, .tsv, .jsonl, .parquet, WebDataset .tar shards (a .tar, shards-{000..099}.tar, 'shards/*.tar'), "
        "a Hugging Face dataset (save_to_disk folder or hf-dataset:NAME); each may be an fsspec URL (s3://, gs://, "
        "hf://, ...)",
    )
    hf = parser.add_argument_group("Hugging Face dataset sources")
    hf.add_argument("--image-column", help="image column (default: the first of image, img, jpg, png, webp)")
    hf.add_argument("--caption-column", help="caption column (default: the first of caption, text, prompt, txt)")
    hf.add_argument("--split", help="split to read (default: train, or the only one a saved folder holds)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from flowtrain.inspect import inspect_dataset, summary

    report = inspect_dataset(
        _source(args), trigger=args.trigger, resolution=args.resolution, dedup=not args.no_dedup,
        dup_distance=args.dup_distance, progress=not args.quiet, out=args.out, bucket_sides=args.bucket_sides,
        multiple=args.pixel_multiple, max_aspect=args.max_aspect,
    )  # fmt: skip
    print(summary(report))
    print(f"report: {Path(args.out) / 'inspect_report.json'}, histogram: {Path(args.out) / 'inspect_histogram.png'}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from flowtrain.caption import Captioner, caption_source, summary

    src = _source(args)
    captioner = Captioner(
        args.model, device=args.device, dtype=args.dtype, prompt=args.prompt, max_new_tokens=args.max_new_tokens
    )
    report = caption_source(
        src, captioner, jsonl=args.jsonl, trigger=args.trigger, prefix=args.prefix, suffix=args.suffix,
        overwrite=args.overwrite_captions, batch_size=args.batch_size, progress=not args.quiet,
    )  # fmt: skip
    print(summary(report, src))
    for failed in report.failed_items[:10]:
        print(f"  failed: {failed['key']}: {failed['reason']}")
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from flowtrain.data.fs import is_url
    from flowtrain.data.precompute import precompute
    from flowtrain.outputs import cache_is_finished, output_slot

    cfg = _model_config(args, args.model, need="precompute")
    out = _given(args.out, cfg.dataset.cache_dir)
    if not out:
        raise ValueError("precompute needs --out (or --config with dataset.cache_dir)")
    # before the output folder is touched: a bad flag changes nothing
    buckets = _bucket_spec(args, cfg.model, cfg.dataset.buckets)
    options = dict(resolution=args.resolution, batch_size=args.batch_size, device=args.device,
                   progress=not args.quiet, video=cfg.dataset.video, buckets=buckets)  # fmt: skip
    if is_url(out):  # object storage: encoded in a local staging folder, uploaded when complete (data.cache_remote)
        from flowtrain.data.cache_remote import precompute_to_url

        manifest = precompute_to_url(args.raw_dir, out, cfg.model, overwrite=args.overwrite, staging=args.staging,
                                     **options)  # fmt: skip
        return _precompute_done(args, manifest, out)
    if args.staging:
        raise ValueError(f"--staging is for a URL --out (s3://...); --out {out} is a local folder, written in place")
    # An unfinished cache of the same settings is continued (precompute checks the settings once the model is loaded).
    unfinished = not args.overwrite and not cache_is_finished(Path(out))
    # Under `accelerate launch` only the main process claims `out`; the others write into it after it has (a barrier).
    with output_slot(out, "precompute", flag="--out", overwrite=args.overwrite, continuing=unfinished,
                     enabled=_is_main_process()):  # fmt: skip
        manifest = precompute(args.raw_dir, out, cfg.model, **options)
    return _precompute_done(args, manifest, out)


def _precompute_done(args: argparse.Namespace, manifest, out: str) -> int:
    if _is_main_process():
        print(f"precompute: {manifest.num_rows} rows → {out} (fingerprint {manifest.fingerprint['id']})")
        if any("bucket" in sh for sh in manifest.shards):
            from flowtrain.data.buckets import describe_counts, shard_counts

            print(f"  buckets (height x width: rows): {describe_counts(shard_counts(manifest.shards))}")
        if any("frames" in sh for sh in manifest.shards):  # a video cache with its images as one-frame clips
            from flowtrain.data.clips import frame_counts

            counts = ", ".join(f"{f}: {n}" for f, n in frame_counts(manifest).items())
            print(f"  clip lengths (frames: rows): {counts}")
    return 0


def cmd_class_images(args: argparse.Namespace) -> int:
    from flowtrain.data.class_images import class_images

    cfg = _model_config(args, args.model, need="class-images")
    done = class_images(args.out, args.class_prompt, args.num_class_images, cfg.model, resolution=args.resolution,
                        seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                        batch_size=args.batch_size, device=args.device, progress=not args.quiet,
                        video=cfg.dataset.video)  # fmt: skip
    print(f"class-images: {args.num_class_images} samples ({done.sampled} sampled now) → {done.cache}; train with "
          f"dataset.class_cache_dir={done.cache}")  # fmt: skip
    return 0


def _bucket_spec(args: argparse.Namespace, model, conf=None):
    """precompute's aspect-ratio buckets: `conf` (the config's dataset.buckets) with the flags over it (--buckets /
    --no-buckets, --bucket-sides, --max-aspect); targets --resolution and the sides, sides multiples of the model's
    pixel multiple. None when buckets are off."""
    from flowtrain.config.buckets import BucketsConfig

    conf = conf or BucketsConfig()
    enabled = conf.enabled if args.buckets is None else args.buckets
    if not enabled:
        if args.bucket_sides or args.max_aspect is not None:
            raise ValueError(
                "--bucket-sides and --max-aspect shape aspect-ratio buckets: add --buckets "
                "(or set dataset.buckets.enabled: true in the config)"
            )
        return None
    from flowtrain.data.buckets import BucketSpec
    from flowtrain.models import get_family

    multiple = get_family(model.family).pixel_multiple(model)
    sides = args.bucket_sides or conf.sides
    max_aspect = conf.max_aspect if args.max_aspect is None else args.max_aspect
    return BucketSpec((args.resolution, *sides), multiple, max_aspect)


def _model_config(args: argparse.Namespace, model: str | None, *, need: str, base=None):
    """The config whose `model:` section a verb that only needs the model (precompute, sample) runs with: from
    --config (or `base`, e.g. a run's config.yaml) with --model, --dtype and dotted overrides on top. Without a
    config the family is detected from the pipeline's model_index.json."""
    from flowtrain.config import FlowtrainConfig, load_config, resolve_mapping, validate_config
    from flowtrain.models import detect_family

    overrides = list(getattr(args, "overrides", []))
    if model is not None:
        overrides.append(f"model.pretrained={model}")
    if getattr(args, "dtype", None) is not None:
        overrides.append(f"model.dtype={args.dtype}")
    if getattr(args, "config", None):
        return load_config(args.config, overrides)
    if base is None:
        if model is None:
            raise ValueError(f"{need} needs --model (a pipeline folder or hub id) or --config with model.pretrained")
        family, class_name = detect_family(model, download=True)  # a hub id: fetch model_index.json (loads next)
        named = any(o.startswith("model.family=") for o in overrides)
        if class_name is None and not named:
            raise FileNotFoundError(
                f"could not load {model!r}: no model_index.json there, in the local Hugging Face cache, or from the "
                "hub (offline or no such repository?); give a diffusers pipeline folder or hub id, or name the "
                "family with model.family=NAME"
            )
        base = {"model": {"pretrained": model, **({"family": family} if family else {})}}
    return validate_config(resolve_mapping(base, overrides, source=f"flowtrain {need}"), FlowtrainConfig)


def _given(flag: Any, *fallbacks: Any) -> Any:
    """The flag's value if it was given, else the first fallback that is set. `is not None`, never `or`: a given
    0 is the user's value (refused by validation if it makes no sense), not a cue to use the default."""
    return next((v for v in (flag, *fallbacks) if v is not None), None)


def _train_config(args: argparse.Namespace):
    from flowtrain.config import load_config

    overrides = list(args.overrides)
    # `is not None`: a given value always applies, so `--max_train_steps 0` is refused by validation, not ignored
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.max_train_steps is not None:
        overrides.append(f"train.max_steps={args.max_train_steps}")
    if args.precomputed_data_dir is not None:
        overrides.append(f"dataset.cache_dir={args.precomputed_data_dir}")
    return load_config(args.config, overrides)


def _has_checkpoint(run_dir: Path) -> bool:
    from flowtrain.train.checkpoint import list_checkpoints

    stages = sorted((run_dir / "stages").glob("*")) if (run_dir / "stages").is_dir() else []  # a pipeline's
    return any(list_checkpoints(d) for d in [run_dir, *stages])


def cmd_train(args: argparse.Namespace) -> int:
    from flowtrain.outputs import output_slot, resumes_in_place

    cfg = _train_config(args)
    resume = args.resume_from_checkpoint
    if resume is not None and args.overwrite:
        raise ValueError("--overwrite starts the run afresh and --resume_from_checkpoint continues it: give one")
    if args.from_source is None and (args.raw_dir is not None or args.keep_duplicates or args.resolution):
        raise ValueError("--raw-dir, --keep-duplicates and --resolution are for `train --from SRC`; give --from")
    if resume not in (None, "latest") and not cfg.stages:  # checked now, not after the model has loaded
        from flowtrain.train.checkpoint import resolve_resume

        resolve_resume(cfg.output_dir, resume)
    slot = output_slot(
        cfg.output_dir,
        "train",
        flag="output_dir",
        overwrite=args.overwrite,
        continuing=resumes_in_place(resume, cfg.output_dir),
        how_to_continue="continue that run with --resume_from_checkpoint latest",
        keep_partial=_has_checkpoint,  # a failed run that wrote a checkpoint can be resumed: keep it
        enabled=_is_main_process(),  # one process claims the folder; the others write into it later
    )
    with slot as claimed:  # claimed first: a refused output_dir costs no preparing; a failed stage restores it
        from flowtrain.track import start_tracking

        if not cfg.stages:  # a pipeline's stages each start their own
            start_tracking(cfg, is_main=_is_main_process())  # MLflow's child process imports while torch does
        if args.from_source is not None:
            from flowtrain.chain import prepare_and_precompute

            prepare_and_precompute(args, cfg)
        if cfg.stages:  # a pipeline (docs/pipelines.md): its stages one after another
            from flowtrain.train.stages import run_pipeline as train
        else:
            from flowtrain.train.loop import train

        result = train(cfg, resume=resume, progress=not args.quiet)
        claimed.unfinished = bool(result.interrupted)  # resumable: the replaced output stays until it finishes
    if result.interrupted:
        from flowtrain.train.errors import EXIT_INTERRUPTED

        print(
            f"flowtrain train: stopped by {result.interrupted} at step {result.step} after writing "
            f"{result.output_dir / f'checkpoint-{result.step}'}; continue with --resume_from_checkpoint latest "
            f"(exit code {EXIT_INTERRUPTED}).{claimed.note()}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    last = result.losses[max(result.losses)] if result.losses else float("nan")
    for name, end in getattr(result, "stages", {}).items():
        print(f"stage {name}: ended at step {end['step']} ({end['ended']})")
    print(f"train: step {result.step}, last loss {last:.4f} → {result.output_dir}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from flowtrain.config import dump_config

    cfg = _train_config(args)
    print(dump_config(cfg), end="")
    if cfg.stages:  # the plan, as YAML comments: the output stays a config
        from flowtrain.config.stages import plan_lines

        print("\n".join(f"# {line}" for line in plan_lines(cfg)))
    print(f"# {args.config}: OK", file=sys.stderr)
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        if not Path(args.prompts).is_file():
            raise FileNotFoundError(
                f"--prompts {args.prompts}: no such file; give a text file with one prompt per line"
            )
        prompts += [p.strip() for p in Path(args.prompts).read_text(encoding="utf-8").splitlines() if p.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt TEXT or a --prompts FILE with one prompt per line")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    from flowtrain import weights_check
    from flowtrain.outputs import output_slot

    prompts = _read_prompts(args)
    # Every path is checked before anything loads: a wrong one fails at once, naming the flag and the file.
    weights_check.pipeline_path(args.model)
    lora = weights_check.lora_file(args.lora) if args.lora is not None else None
    if lora is not None:  # a pipeline stage's LoRA trained on an earlier stage's weights: sample on that base
        from flowtrain.train.stages import sampling_base

        args.transformer = sampling_base(lora)
        if args.transformer is not None:
            print(f"sample: {lora} was trained on the base {args.transformer} (its pipeline.json): using it")
    if args.transformer is not None:
        weights_check.transformer_folder(args.transformer)
    # A run dir: sample with the model options it was trained with (family, text settings), unless overridden.
    run_model = _run_model_near(args.lora or args.transformer)
    base = None if run_model is None else {"model": run_model}
    model = _model_config(args, args.model, need="sample", base=base).model
    with output_slot(args.out, "sample", flag="--out", overwrite=args.overwrite):
        _sample(args, prompts, model, lora)
    print(f"sample: {len(prompts) * args.num_images} images and grid.png → {args.out}")
    return 0


def _sample(args: argparse.Namespace, prompts: list[str], model: Any, lora: Path | None) -> None:
    from flowtrain.dtypes import torch_dtype
    from flowtrain.gc_pause import loading
    from flowtrain.media import sample_fps
    from flowtrain.sample import generate, load_sampling_pipeline, save_images

    with loading():
        pipe = load_sampling_pipeline(model, lora=lora and str(lora), transformer=args.transformer,
                                      dtype=torch_dtype(args.sample_dtype), device=args.device)  # fmt: skip
    images = generate(
        pipe,
        prompts,
        model,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        images_per_prompt=args.num_images,
    )
    save_images(images, args.out, prompts, args.num_images, fps=sample_fps(model))


def cmd_plot(args: argparse.Namespace) -> int:
    from flowtrain.track.plots import plot_run

    written = plot_run(args.run_dir)
    print(f"plot: {', '.join(p.name for p in written)} → {Path(args.run_dir) / 'graphs'}")
    return 0


def cmd_autoencoder(args: argparse.Namespace) -> int:
    from flowtrain.autoencoder import load_autoencoder_config, train_autoencoder
    from flowtrain.outputs import output_slot

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir is not None else [])
    cfg = load_autoencoder_config(args.config, overrides)
    resume = args.resume_from_checkpoint
    with output_slot(cfg.output_dir, "autoencoder", flag="output_dir", overwrite=args.overwrite,
                     continuing=resume is not None):  # fmt: skip
        result = train_autoencoder(cfg, resume=resume, progress=not args.quiet)
    rec = result.stats.get("reconstruction_l1")
    loss = result.final.get("loss", float("nan"))
    rec_text = f", reconstruction L1 {rec:.4f}" if rec is not None else ""
    print(f"autoencoder: step {result.step}, loss {loss:.4f}{rec_text} → {result.vae_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flowtrain.outputs import output_slot

    if args.out is None:
        args.out = "runs/demo-video" if args.video else "runs/demo"
    with output_slot(args.out, "demo", flag="--out", overwrite=args.overwrite):
        if args.video:  # the text-to-video demo (flowtrain.demo.video, configs/demo/video.yaml)
            from flowtrain.demo.video import run_video_demo as run_demo
            from flowtrain.demo.video import video_summary as summary
        else:
            from flowtrain.demo.run import run_demo, summary

        rep = run_demo(args.config, args.out, quick=args.quick, overrides=args.overrides, progress=not args.quiet)
    print(summary(rep))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flowtrain.export import export

    path = export(args.source, args.format, args.out, family=args.family, overwrite=args.overwrite)
    print(f"export: {args.format} → {path}")
    from flowtrain.train.stages import sampling_base

    if (base := sampling_base(Path(args.source))) is not None:  # say so: applied to model.pretrained it is wrong
        print(
            f"export: this LoRA is relative to the pipeline stage's base {base}, not model.pretrained: apply it there"
        )
    return 0


def _run_model_near(path: str | None) -> dict | None:
    """The `model:` section of the config.yaml of the run a LoRA / transformer came from, if there is one. Only
    that section: sampling needs nothing else, and a run written by an older flowtrain may hold keys this one no
    longer has elsewhere."""
    if path is None:
        return None
    p = Path(path)
    for d in (p if p.is_dir() else p.parent, (p if p.is_dir() else p.parent).parent):
        if (d / "config.yaml").exists():
            import yaml

            model = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("model")
            return model if isinstance(model, dict) else None
    return None


# ---------------------------------------------------------------------------------------------------- parser
def _overwrite_flag(parser: argparse.ArgumentParser, more: str = "") -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier output of this verb in the output folder; without it that is refused. The old "
        "output is moved aside and deleted only once the new one is complete (docs/reliability.md)" + more,
    )


def _chain_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "from images in one command",
        "--from SRC runs `prepare` and `precompute` before training, in this process: the raw shards go to --raw-dir, "
        "the cache to dataset.cache_dir, each written exactly as its verb writes it. A stage whose output is already "
        "current is reused (the same source and settings; a cache of the same fingerprint made from those shards), "
        "and the message says so. See docs/training.md, 'From images in one command'.",
    )
    g.add_argument("--from", dest="from_source", type=_path, metavar="SRC",
                   help="images + captions as `flowtrain prepare` reads them (folder, .tsv, .jsonl, .parquet), or a "
                   "prepared raw folder")  # fmt: skip
    g.add_argument("--raw-dir", type=_path, help="where --from writes raw shards (default: dataset.cache_dir + '-raw')")
    g.add_argument("--resolution", type=_positive_int, help="precompute's square resolution (default: the existing "
                   f"cache's in dataset.cache_dir, else {PRECOMPUTE_RESOLUTION})")  # fmt: skip
    g.add_argument("--keep-duplicates", action="store_true", help="prepare keeps byte-identical copies of an image")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowtrain",
        description="Train flow-matching text-to-image transformers: prepare → precompute → train → sample.",
        epilog="Run `flowtrain VERB --help` for each verb's options.",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser(
        "prepare",
        help="images + captions → raw Parquet shards",
        description="Read a folder (image or video + same-name .txt), a TSV (image_path<TAB>caption), a JSONL "
        "manifest (image, caption), a Parquet file, WebDataset shards or a Hugging Face dataset, locally or at an "
        "fsspec URL; write raw shards, a manifest and a report of skipped items (docs/prepare.md). Videos (.mp4, "
        ".webm, .mov, or `video` fields in TSV/JSONL) are kept as they are, with fps and frame count (docs/video.md).",
    )
    _source_flags(s)
    s.add_argument(
        "--out", type=_path, required=True,
        help="output folder for raw shards, or an fsspec URL (s3://bucket/raw: staged locally, uploaded when complete)",
    )  # fmt: skip
    _overwrite_flag(s)
    s.add_argument("--resolution", type=_positive_int, help="downscale so the short side is at most this")
    s.add_argument("--shard-size", type=_positive_int, default=1000, help="rows per shard (default 1000)")
    s.add_argument(
        "--min-size", type=_positive_int, default=16, help="skip images smaller than this on a side (default 16)"
    )
    s.add_argument(
        "--min-frames", type=_positive_int, default=1,
        help="skip videos with fewer frames than this as too short (default 1; docs/video.md)",
    )  # fmt: skip
    s.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="keep byte-identical copies of an image (e.g. one image listed with two captions); by default each "
        "copy after the first is skipped as `duplicate of KEY` and the summary says how many",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser(
        "inspect",
        help="report a dataset's problems, sizes, captions and near-duplicates",
        description="Read a source (anything `prepare` reads) or a prepared raw folder and report: corrupt images, "
        "missing or empty captions, a resolution and aspect-ratio histogram, caption lengths, the trigger word's "
        "coverage and near-duplicates by perceptual hash. Writes inspect_report.json and inspect_histogram.png into "
        "--out and prints a summary. Image sizes come from file headers; only hashing decodes (JPEGs at reduced "
        "scale). See docs/prepare.md.",
    )
    _source_flags(s)
    s.add_argument("--out", type=_path, required=True, help="folder for inspect_report.json and inspect_histogram.png")
    s.add_argument("--trigger", help="report how many captions contain this word")
    s.add_argument(
        "--resolution", type=_positive_int,
        help="training resolution: count images smaller than it, and preview the aspect-ratio buckets "
        "`precompute --buckets` would give them",
    )  # fmt: skip
    s.add_argument(
        "--bucket-sides", type=_sides, default=[], metavar="S1,S2",
        help="the bucket preview's extra target sides, as precompute's --bucket-sides (default: none)",
    )  # fmt: skip
    s.add_argument(
        "--max-aspect", type=float, default=2.0, help="the bucket preview's largest long / short side, as "
        "precompute's --max-aspect (default 2.0)",
    )  # fmt: skip
    s.add_argument(
        "--pixel-multiple", type=_positive_int, default=16,
        help="bucket sides are multiples of this: the model's (VAE factor × patch; 16 for every shipped family)",
    )  # fmt: skip
    s.add_argument("--no-dedup", action="store_true", help="skip perceptual hashing: read image headers only")
    s.add_argument(
        "--dup-distance", type=int, default=4, choices=range(64), metavar="BITS",
        help="pHash bits two images may differ by and still count as near-duplicates (default 4 of 64)",
    )  # fmt: skip
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser(
        "caption",
        help="write captions for uncaptioned images with an image-to-text model",
        description="Caption the images of a source with a transformers image-to-text or vision-language model "
        "(BLIP, GIT, Florence-2, Qwen2.5-VL, ...: any that AutoModelForImageTextToText loads). Only images without "
        "a caption are captioned unless --overwrite-captions. Writes IMAGE.txt beside each image (folder sources) "
        "or one JSONL (--jsonl). A rerun continues where an interrupted one stopped. See docs/prepare.md.",
    )
    _source_flags(s)
    s.add_argument("--model", required=True, help="Hub name or local folder (Salesforce/blip-image-captioning-large)")
    s.add_argument("--jsonl", type=_path, help="write {key, image, caption, generated} lines here, not sidecar .txt")
    s.add_argument("--trigger", help="trigger word; with it --prefix defaults to '{trigger}, '")
    s.add_argument("--prefix", help="text before each generated caption; {trigger} is replaced")
    s.add_argument("--suffix", default="", help="text after each generated caption; {trigger} is replaced")
    which = s.add_mutually_exclusive_group()
    which.add_argument(
        "--missing-only", dest="overwrite_captions", action="store_false",
        help="caption only images without a (non-empty) caption (the default)",
    )  # fmt: skip
    which.add_argument(
        "--overwrite-captions", action="store_true", help="caption every image, replacing existing captions"
    )
    s.add_argument("--prompt", help="instruction or text prefix for the model (e.g. Florence-2's <DETAILED_CAPTION>)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=60, help="caption length limit (default 60)")
    s.add_argument("--batch-size", type=_positive_int, default=8, help="images per generate call (default 8)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="model dtype")
    s.add_argument("--device", type=_device, help="cuda / cuda:N / cpu (default: cuda if available)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_caption, overwrite_captions=False)  # not store_false's True: never overwrite unasked

    s = sub.add_parser(
        "precompute",
        help="raw shards → VAE latents + text embeddings cache",
        description="Run the VAE and text encoders once over the raw shards. The model comes from --model (its "
        "family is detected from model_index.json) or --config (model.* and dataset.cache_dir); the family's own "
        "options are dotted overrides, e.g. model.max_sequence_length=256 (docs/models.md lists each family's). "
        "Videos are cut into clips as dataset.video says, e.g. dataset.video.frames=33 (docs/video.md). "
        "On N processes or GPUs, `accelerate launch -m flowtrain precompute ...`: each process encodes its own cache "
        "shards, and a rerun continues each where it stopped.",
    )
    s.add_argument("raw_dir", type=_path, help="output folder of `flowtrain prepare`")
    s.add_argument("--out", type=_path, help="cache folder or fsspec URL, e.g. s3://bucket/cache (default: "
                   "dataset.cache_dir of --config)")  # fmt: skip
    _overwrite_flag(s, "; an unfinished cache of the same settings is continued without it")
    s.add_argument(
        "--staging", type=_path,
        help="with a URL --out: the local folder to encode into before the upload (default: one per URL under "
        "~/.cache/flowtrain/precompute-staging; a rerun continues it)",
    )  # fmt: skip
    s.add_argument(
        "--model", type=_path, help="pipeline hub id or local folder (default: model.pretrained of --config)"
    )
    s.add_argument("--config", type=_path, help="training config to take model settings from")
    s.add_argument("overrides", nargs="*", help="dotted model options, e.g. model.max_sequence_length=256")
    s.add_argument(
        "--resolution", type=_positive_int, default=PRECOMPUTE_RESOLUTION,
        help=f"square training resolution; with --buckets, the target area's side (default {PRECOMPUTE_RESOLUTION})",
    )  # fmt: skip
    s.add_argument(
        "--buckets", action=argparse.BooleanOptionalAction, default=None,
        help="aspect-ratio buckets: each image at the bucket nearest its aspect (area about --resolution², sides "
        "multiples of the model's pixel multiple), scaled to cover it and centre-cropped; docs/prepare.md "
        "(default: dataset.buckets of --config; --no-buckets: a square cache whatever the config says)",
    )  # fmt: skip
    s.add_argument(
        "--bucket-sides", type=_sides, default=[], metavar="S1,S2",
        help="with --buckets, more target areas (S² each): an image goes to the largest it reaches without upscaling "
        "(default: dataset.buckets.sides)",
    )  # fmt: skip
    s.add_argument(
        "--max-aspect", type=float,
        help="with --buckets, the largest long / short side ratio of a bucket (default: dataset.buckets.max_aspect, "
        "2.0); wider images are cropped",
    )  # fmt: skip
    s.add_argument("--batch-size", type=_positive_int, default=8, help="encoder batch size (default 8)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="sets model.dtype: encoders + storage")
    s.add_argument("--device", type=_device, help="cuda / cuda:N / cpu (default: cuda if available)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_precompute)

    for verb, helptext, func in (
        (
            "train",
            "train a LoRA or full fine-tune on a latent cache (a config with stages: runs them, docs/pipelines.md)",
            cmd_train,
        ),
        ("check", "validate a config and print it resolved (a pipeline: also its plan of stages)", cmd_check),
    ):
        s = sub.add_parser(
            verb,
            help=helptext,
            description=helptext + ". Overrides are dotted key=value pairs "
            "parsed as YAML, e.g. train.learning_rate=3e-4 lora.rank=32.",
        )
        s.add_argument("config", type=_path, help="YAML config (may `extends:` another)")
        s.add_argument("overrides", nargs="*", help="dotted overrides key=value")
        s.add_argument("--output_dir", "--output-dir", dest="output_dir", type=_path, help="sets output_dir")
        s.add_argument(
            "--max_train_steps", "--max-train-steps", dest="max_train_steps", type=int, help="sets train.max_steps"
        )
        s.add_argument(
            "--precomputed_data_dir",
            "--precomputed-data-dir",
            dest="precomputed_data_dir",
            type=_path,
            help="sets dataset.cache_dir",
        )
        s.add_argument(
            "--resume_from_checkpoint",
            "--resume-from-checkpoint",
            dest="resume_from_checkpoint",
            type=_path,
            help="`latest` (newest complete checkpoint in output_dir) or a checkpoint folder",
        )
        if verb == "train":
            _overwrite_flag(s, " (not with --resume_from_checkpoint); with --from also the raw shards and cache, "
                            "where they are not current")  # fmt: skip
            _chain_flags(s)
        s.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
        s.set_defaults(func=func)

    s = sub.add_parser(
        "sample",
        help="generate images from a base model + LoRA / transformer",
        description="Generate PNGs (one per prompt and image) and grid.png with the model family's diffusers "
        "pipeline. The model options (family, text settings) are read from the run's config.yaml next to "
        "--lora/--transformer when present; dotted overrides such as model.max_sequence_length=256 change them.",
    )
    s.add_argument("--model", type=_path, required=True, help="base pipeline hub id or folder")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--lora", type=_path, help="pytorch_lora_weights.safetensors, or the folder holding it")
    g.add_argument("--transformer", type=_path, help="a full fine-tune's transformer folder (diffusers format)")
    s.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    s.add_argument("--prompts", type=_path, help="a file with one prompt per line")
    s.add_argument("--out", type=_path, required=True, help="output folder")
    _overwrite_flag(s)
    s.add_argument(
        "--steps", type=_positive_int, help="denoising steps (default: the family's pipeline default, docs/models.md)"
    )
    s.add_argument(
        "--guidance-scale", type=float,
        help="the family's guidance: real CFG with the empty prompt (1 disables) or a distilled guidance value "
        "(default: the family's pipeline default, docs/models.md)",
    )  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    s.add_argument("--height", type=_positive_int, default=512)
    s.add_argument("--width", type=_positive_int, default=512)
    s.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    s.add_argument("overrides", nargs="*", help="dotted model options, e.g. model.max_sequence_length=256")
    s.add_argument(
        "--dtype", dest="sample_dtype", choices=["float32", "bfloat16", "float16"], default="float32",
        help="sampling dtype (default float32)",
    )  # fmt: skip
    s.add_argument("--device", type=_device, help="cuda / cuda:N / cpu (default: cuda if available)")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser(
        "class-images",
        help="DreamBooth class images: sample, prepare and precompute them for prior preservation",
        description="Sample --num-class-images images of --class-prompt with the base model (the family's "
        "pipeline; image i uses seed SEED+i), then prepare and precompute them: OUT/images, OUT/raw, OUT/cache. "
        "A video family samples .mp4 clips of model.num_frames frames, cut into clips as dataset.video says (give "
        "the options the instance cache was precomputed with). A rerun samples only the missing ones and continues "
        "the cache. Train with dataset.class_cache_dir=OUT/cache (configs/klein4b/dreambooth.yaml).",
    )
    s.add_argument("out", type=_path, help="folder for images/, raw/ and cache/")
    s.add_argument("--class-prompt", required=True, help="the class, e.g. 'a photo of a dog' (also each caption)")
    s.add_argument("--num-class-images", type=_positive_int, required=True,
                   help="how many class images (clips for a video family); the cache holds exactly these")  # fmt: skip
    s.add_argument(
        "--model", type=_path, help="pipeline hub id or local folder (default: model.pretrained of --config)"
    )
    s.add_argument("--config", type=_path, help="training config to take model settings from")
    s.add_argument("overrides", nargs="*", help="dotted model and dataset.video options, e.g. "
                   "model.max_sequence_length=256 dataset.video.frames=33")  # fmt: skip
    s.add_argument("--resolution", type=_positive_int, default=PRECOMPUTE_RESOLUTION,
                   help=f"sampled square size and precompute resolution (default {PRECOMPUTE_RESOLUTION})")  # fmt: skip
    s.add_argument("--steps", type=_positive_int, help="denoising steps (default: the family's pipeline default)")
    s.add_argument("--guidance-scale", type=float, help="guidance (default: the family's pipeline default)")
    s.add_argument("--seed", type=int, default=0, help="image i is sampled with seed SEED+i (default 0)")
    s.add_argument("--batch-size", type=_positive_int, default=1, help="images per pipeline call (default 1)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="sets model.dtype: sampling, encoders "
                   "and cache storage")  # fmt: skip
    s.add_argument("--device", type=_device, help="cuda / cuda:N / cpu (default: cuda if available)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_class_images)

    s = sub.add_parser(
        "plot",
        help="graphs and a summary of a run's metrics",
        description="Read RUN_DIR/logs/metrics.jsonl and write PNG graphs (loss, loss by σ, learning rate, "
        "throughput, memory) and summary.txt into RUN_DIR/graphs/. Training does this at its end too.",
    )
    s.add_argument("run_dir", type=_path, help="a training output_dir")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser(
        "export",
        help="write a trained LoRA or full fine-tune in diffusers, ComfyUI or the original layout",
        description="Write the final weights of a training run (or a LoRA file) in another format: `comfyui` "
        "(original module names under diffusion_model., lora_down/lora_up and an .alpha per module), `original` "
        "(original names, lora_A/lora_B with alpha folded in: what diffusers' converters read) or `diffusers` "
        "(what training writes). A full fine-tune becomes one .safetensors in the original layout. q/k/v LoRAs "
        "are fused exactly. Mapping tables, sources and limits: docs/export.md.",
    )
    s.add_argument("source", type=_path, help="a training run folder (its output_dir) or a LoRA .safetensors file")
    s.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="the format to write")
    s.add_argument("--out", type=_path, help="the file to write (default: next to the source, e.g. "
                   "pytorch_lora_weights.comfyui.safetensors or transformer.original.safetensors)")  # fmt: skip
    s.add_argument("--family", help="the model family (default: from the run's config.yaml next to the source)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused without it)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "autoencoder",
        help="train a model family's VAE on prepared images and fit its latent stats",
        description="Train a VAE (reconstruction + β-KL with warm-up and free bits; optional GAN, perceptual loss, "
        "EMA; docs/autoencoder.md) on the raw shards of `flowtrain prepare`, "
        "fit the latent statistics its model family normalises with, and save OUTPUT_DIR/vae (diffusers format). "
        "The config's `family:` names the family (default flux2_klein); docs/autoencoder.md lists which VAE each "
        "family trains and on what data (images, one-frame clips, or video clips with data.frames).",
    )
    s.add_argument("config", type=_path, help="autoencoder YAML (e.g. configs/demo/autoencoder.yaml)")
    s.add_argument("overrides", nargs="*", help="dotted overrides key=value, e.g. data.raw_dir=runs/raw")
    s.add_argument("--output_dir", "--output-dir", dest="output_dir", type=_path, help="sets output_dir")
    s.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", dest="resume_from_checkpoint",
                   help="`latest` (newest complete checkpoint in output_dir; a fresh start when there is none) or a "
                   "checkpoint folder: continues exactly where it stopped")  # fmt: skip
    _overwrite_flag(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    s.set_defaults(func=cmd_autoencoder)

    s = sub.add_parser(
        "demo",
        help="train on real digits on a CPU in minutes and measure prompt adherence",
        description="scikit-learn digits → prepare → autoencoder → precompute → train a transformer from "
        "scratch → sample each digit with CFG → score with a classifier. Writes samples.png, loss_curve.png and "
        "demo_report.json into --out. See docs/demo.md.",
    )
    s.add_argument("overrides", nargs="*", help="dotted overrides of the demo config, e.g. sample.per_digit=20")
    s.add_argument("--config", type=_path, help="demo config (default: configs/demo/demo.yaml of this checkout; "
                   "with --video configs/demo/video.yaml)")  # fmt: skip
    s.add_argument("--out", type=_path, help="run folder (default runs/demo; with --video runs/demo-video)")
    s.add_argument("--video", action="store_true", help="the text-to-video demo: moving digits, a Wan video VAE "
                   "and transformer, digit + motion adherence (configs/demo/video.yaml; docs/video.md)")  # fmt: skip
    _overwrite_flag(s)
    s.add_argument("--quick", action="store_true", help="a few steps per stage: checks the plumbing in seconds")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "launch",
        help="accelerate launch, exiting with the training processes' own exit code (75 after a preemption)",
        description="Takes exactly the arguments of `accelerate launch` (e.g. `flowtrain launch --multi_gpu "
        "--num_processes 8 -m flowtrain train cfg.yaml`) and runs it, but exits with the code of the process "
        "that caused a failure (see docs/reliability.md) instead of accelerate's 1 for any failure.",
        add_help=False,
    )
    s.set_defaults(func=None)
    return p


# Verbs that never run torch's OpenMP: no need to look at the machine's load for them.
_NO_TORCH_COMPUTE = frozenset({"check", "plot", "inspect"})


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`flowtrain ARGV` parsed; also how `train --from` builds the arguments of the verbs it runs."""
    parser = build_parser()
    # Overrides (key=value) may stand anywhere among the options, which plain argparse positionals can't do.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def run() -> NoReturn:
    """The console entry (`flowtrain`, `python -m flowtrain`): `main()`, then the process ends without the
    interpreter's slow teardown (`flowtrain.exit`). An exception that escapes `main` (`--debug`) ends it the usual
    way, with its traceback."""
    from flowtrain.exit import exit_now
    from flowtrain.gc_pause import freeze_after_loading

    freeze_after_loading()  # this process is the command's: what its models' loading leaves is frozen (gc_pause)
    exit_now(main())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb_at = 1 if argv[:1] == ["--debug"] else 0
    if argv[verb_at : verb_at + 1] == ["launch"]:  # the arguments after it are `accelerate launch`'s, unparsed here
        from flowtrain.launch import launch

        return launch(argv[verb_at + 1 :])
    args = parse_args(argv)
    # Before any verb imports torch (parsing does not): OpenMP reads its wait policy once, when torch loads.
    openmp = None if args.verb in _NO_TORCH_COMPUTE else choose_wait_policy()
    _setup_logging(getattr(args, "quiet", False))
    if openmp is not None:  # said when it matters: other processes compete for the cores this run will use
        level = logging.INFO if openmp.startswith("PASSIVE") else logging.DEBUG
        logging.getLogger("flowtrain").log(level, "OpenMP wait policy %s", openmp)
    if args.debug:
        return args.func(args)
    from flowtrain.config import ConfigError
    from flowtrain.train.errors import TrainingAborted

    try:
        return args.func(args)
    except KeyboardInterrupt:  # a second Ctrl-C during training: abort without a traceback
        print(f"flowtrain {args.verb}: aborted", file=sys.stderr)
        return 130
    except TrainingAborted as e:
        # The run stopped for a reason the user must act on (non-finite loss, checkpoint write failure); the last
        # checkpoint is intact and the exit code says which reason (docs/reliability.md).
        print(f"flowtrain {args.verb}: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, FileNotFoundError, ValueError, KeyError, ImportError, *_PATH_ERRORS) as e:
        # User-facing problems (bad config, missing files, incompatible cache, a path that is not what it should
        # be): one clear message, no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"flowtrain {args.verb}: error: {_without_worker_traceback(e, str(msg))}", file=sys.stderr)
        print("(run with --debug for the full traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


def _without_worker_traceback(e: BaseException, msg: str) -> str:
    """An error raised in a DataLoader worker comes back with the worker's traceback inside its message; keep the
    original message only."""
    if "Original Traceback" not in msg:
        return msg
    marker = f"{type(e).__name__}: "
    at = msg.rfind(marker)
    return (msg[at + len(marker) :] if at >= 0 else msg.strip().splitlines()[-1]).strip() + " (in a DataLoader worker)"


if __name__ == "__main__":
    sys.exit(main())
