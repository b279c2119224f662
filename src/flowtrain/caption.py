"""`flowtrain caption SRC`: write captions for images that have none, with a transformers image-to-text model.

Any model `AutoModelForImageTextToText` loads works, by Hub name or local folder: BLIP, GIT, Florence-2,
VisionEncoderDecoder captioners, and chat VLMs such as Qwen2.5-VL (their processor's chat template is applied to
`--prompt`). Existing captions are never replaced unless `overwrite` is asked for. Output is either a sidecar
`.txt` beside each image (folder sources, as `prepare` reads them) or one JSONL file, which is also the progress
log: a rerun skips the keys already in it, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

from flowtrain.data.fs import FsPath, describe, is_url
from flowtrain.data.prepare import SkipItem, _pil_guards, _read_bytes, to_rgb
from flowtrain.data.sources import SourceItem, count_items, detect_kind, iter_source

log = logging.getLogger("flowtrain.caption")
PROGRESS_LOG = ".flowtrain-caption.log"  # sidecar mode with overwrite: keys done so far (hidden: never listed)


@dataclass
class CaptionReport:
    """`captioned + kept + resumed + failed == seen` (each listed item lands in exactly one)."""

    seen: int = 0
    captioned: int = 0  # new captions written by this run
    kept: int = 0  # items whose existing caption was left alone
    resumed: int = 0  # done by an earlier, interrupted run
    failed: int = 0
    failed_items: list[dict] = field(default_factory=list)  # each {"key", "path", "reason"}


def compose(text: str, trigger: str | None, prefix: str, suffix: str) -> str:
    """The caption written: `prefix + text + suffix`, `{trigger}` replaced in both; whitespace runs collapsed.

    >>> compose("a dog on grass", "sks", "{trigger}, ", "")
    'sks, a dog on grass'"""
    fill = {"trigger": trigger or ""}
    return " ".join((prefix.format(**fill) + text.strip() + suffix.format(**fill)).split())


class Captioner:
    """A transformers image-to-text model and its processor; `__call__` captions a batch of RGB images."""

    def __init__(self, name: str, *, device: str | None = None, dtype: str = "float32", prompt: str | None = None,
                 max_new_tokens: int = 40) -> None:  # fmt: skip
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from flowtrain.gc_pause import loading

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with loading():
            self.processor = AutoProcessor.from_pretrained(name)
            self.model = AutoModelForImageTextToText.from_pretrained(name, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.chat = getattr(self.processor, "chat_template", None) is not None
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not self.model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # batched generation continues each row right after its own prompt

    def _inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        if self.chat:  # chat VLMs: the image and the instruction as one user turn
            content = [{"type": "image"}, {"type": "text", "text": self.prompt or "Describe this image."}]
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            return self.processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")
        if self.prompt:
            return self.processor(images=images, text=[self.prompt] * len(images), padding=True, return_tensors="pt")
        return self.processor(images=images, return_tensors="pt")

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self._inputs(images).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        # Decoder-only captioners return the prompt before the caption: keep only what was generated.
        n = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        if n and out.shape[1] >= n and torch.equal(out[:, :n].cpu(), inputs["input_ids"].cpu()):
            out = out[:, n:]
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def _load_image(item: SourceItem) -> Image.Image:
    data = _read_bytes(item)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))
    except Image.UnidentifiedImageError as exc:
        raise SkipItem("not a recognised image file") from exc
    except Exception as exc:  # whatever the file, one failed item, never a crashed run
        raise SkipItem(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


class _Sink:
    """Where captions go. Sidecar: `IMAGE.txt` written atomically; JSONL: one record per item, flushed per batch."""

    def __init__(self, src: str | Path, jsonl: str | Path | None, overwrite: bool) -> None:
        self.jsonl = Path(jsonl) if jsonl is not None else None
        self.done: set[str] = set()
        self._file = None
        if self.jsonl is not None:
            self.done = _jsonl_keys(self.jsonl)
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
            cut = self.jsonl.is_file() and not self.jsonl.read_bytes().endswith(b"\n") and self.jsonl.stat().st_size
            self._file = self.jsonl.open("a", encoding="utf-8")
            if cut:  # a killed run left half a line: end it, so the next record starts on a line of its own
                self._file.write("\n")
        elif overwrite:  # sidecar files exist either way, so an overwrite run needs its own record of progress
            self._log_path = Path(str(src)) / PROGRESS_LOG
            text = self._log_path.read_text(encoding="utf-8") if self._log_path.is_file() else ""
            lines = text.split("\n")  # the last is "" unless a kill cut it: then not a key done (it is redone)
            self.done = set(lines[:-1]) - {""}
            self._file = self._log_path.open("a", encoding="utf-8")
            if lines[-1]:  # end the cut line, so the next key starts on a line of its own
                self._file.write("\n")

    def write(self, item: SourceItem, caption: str, generated: bool) -> None:
        if self.jsonl is not None:
            where = str(item.image_path) if item.image_path is not None else item.origin
            record = {"key": item.key, "image": where, "caption": caption, "generated": generated}
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        if not generated:
            return
        _write_sidecar(item.image_path.with_suffix(".txt"), caption)
        if self._file is not None:
            self._file.write(item.key + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self, finished: bool) -> None:
        if self._file is not None:
            self._file.close()
            if finished and self.jsonl is None:
                self._log_path.unlink(missing_ok=True)  # the sidecars are the result; the log was for resuming


def _write_sidecar(path: Path | FsPath, caption: str) -> None:
    data = (caption + "\n").encode("utf-8")
    if isinstance(path, FsPath):
        path.fs.pipe_file(path.path, data)  # object stores replace whole objects: already atomic
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonl_keys(path: Path) -> set[str]:
    """Keys already in an output JSONL (a cut-off last line from a killed run is ignored and redone)."""
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keys.add(json.loads(line)["key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return keys


def _batches(items: Iterator[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    batch: list[SourceItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def caption_source(
    src: str | Path,
    captioner: Any,
    *,
    jsonl: str | Path | None = None,
    trigger: str | None = None,
    prefix: str | None = None,
    suffix: str = "",
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> CaptionReport:
    """Caption the items of `src` that have no caption (all of them with `overwrite`).

    captioner: a callable `list[PIL.Image] -> list[str]` (a `Captioner`). Without `jsonl`, captions are written as
    sidecar `.txt` files, which needs a folder source. `prefix` defaults to `"{trigger}, "` when a trigger is given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kind = detect_kind(src)  # raises for an unknown source
    if jsonl is None and kind != "folder":
        raise ValueError(
            f"{src} is a {kind} source: sidecar .txt captions need a folder of images; write a JSONL with --jsonl PATH"
        )
    if jsonl is None and overwrite and is_url(src):
        raise ValueError(f"{src}: --overwrite-captions at a URL needs --jsonl PATH (its progress log is kept locally)")
    if prefix is None:
        prefix = "{trigger}, " if trigger else ""
    for name, text in (("prefix", prefix), ("suffix", suffix)):
        try:
            text.format(trigger="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"--{name} {text!r}: only {{trigger}} may stand in braces ({exc})") from exc
    report = CaptionReport()
    sink = _Sink(src, jsonl, overwrite)
    bar = tqdm(total=count_items(src), unit="img", disable=not progress, dynamic_ncols=True, desc="caption")
    finished = False
    try:
        with _pil_guards():
            for batch in _batches(iter_source(src), batch_size):
                _caption_batch(batch, captioner, sink, report, overwrite, (trigger, prefix, suffix))
                sink.flush()
                bar.update(len(batch))
                bar.set_postfix(new=report.captioned, kept=report.kept, failed=report.failed, refresh=False)
        finished = True
    finally:
        bar.close()
        sink.close(finished)
    return report


def _caption_batch(batch: list[SourceItem], captioner: Any, sink: _Sink, report: CaptionReport, overwrite: bool,
                   template: tuple[str | None, str, str]) -> None:  # fmt: skip
    todo: list[tuple[SourceItem, Image.Image]] = []
    for item in batch:
        report.seen += 1
        has_caption = item.caption is not None and item.caption.strip() != ""
        if item.key in sink.done:
            report.resumed += 1
        elif item.problem and not item.problem.startswith("caption"):  # a listing problem: no image to caption
            _fail(report, item, item.problem)
        elif (has_caption or item.problem) and not overwrite:  # an unreadable caption file is still the user's
            report.kept += 1
            if has_caption:
                sink.write(item, item.caption.strip(), generated=False)
        else:
            try:
                todo.append((item, _load_image(item)))
            except SkipItem as exc:
                _fail(report, item, str(exc))
    if not todo:
        return
    texts = captioner([im for _, im in todo])
    if len(texts) != len(todo):
        raise RuntimeError(f"the captioner returned {len(texts)} captions for {len(todo)} images")
    for (item, _), text in zip(todo, texts, strict=True):
        if not text.strip():
            _fail(report, item, "the model generated an empty caption")
            continue
        sink.write(item, compose(text, *template), generated=True)
        report.captioned += 1


def _fail(report: CaptionReport, item: SourceItem, reason: str) -> None:
    path = str(item.image_path) if item.image_path is not None else item.origin
    report.failed += 1
    report.failed_items.append({"key": item.key, "path": path, "reason": " ".join(reason.split())})


def summary(report: CaptionReport, src: str | Path) -> str:
    return (
        f"caption: {report.captioned} new, {report.kept} kept (had a caption), {report.resumed} done earlier, "
        f"{report.failed} failed, of {report.seen} in {describe(src)}"
    )


def report_dict(report: CaptionReport) -> dict[str, Any]:
    return asdict(report)
