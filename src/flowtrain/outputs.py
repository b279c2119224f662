"""Earlier output is precious: the rule every verb that writes a folder follows (docs/reliability.md).

A verb writes into a folder that is new, empty, or holds no flowtrain output. A folder holding earlier output of
the same verb is refused, with a message that offers the choices: continue it (where the verb can:
`train --resume_from_checkpoint latest`, `precompute` of an unfinished cache), another folder, or `--overwrite`.
A folder holding another verb's output is refused outright: a typo that points `train` at the latent cache must
not become a way to lose the cache.

`--overwrite` replaces the folder without ever leaving the earlier output half-deleted: the earlier output is
renamed to `.NAME.replaced` next to it (one atomic rename), the verb writes NAME afresh, and the renamed folder is
deleted only once the verb has finished. If the verb fails, the new, partial output is removed and the earlier
output renamed back, exactly as it was; a training run that already wrote a checkpoint is kept instead (hours of
work), next to the earlier one, and the message names both. The new output is built at its final path rather than
in a temporary sibling because runs record their own paths (config.yaml's output_dir, MLflow's artifact URIs, the
demo report) and `train` / `precompute` are continued at that path after an interruption.

Kept free of heavy imports: the CLI calls it before torch loads, so a refusal costs no model loading.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_MARKER = ".flowtrain-demo"  # written by `flowtrain demo` into its --out

# What each verb's output is called in messages.
_WHAT = {
    "prepare": "raw shards",
    "precompute": "a latent cache",
    "train": "a training run",
    "autoencoder": "an autoencoder run",
    "sample": "sampled images",
    "demo": "a demo run",
}


class OutputExistsError(ValueError):
    """The folder holds earlier output the verb would destroy or mix with; the message offers the choices."""


def _nonempty_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _json_field(path: Path, key: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _config_kind(folder: Path) -> str | None:
    """`kind:` of a run's resolved config.yaml (autoencoder runs write `kind: autoencoder`), without parsing YAML."""
    try:
        lines = (folder / "config.yaml").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("kind:")), None)


def _run_evidence(folder: Path) -> list[str]:
    """What a training / autoencoder run leaves that is worth keeping (a config.yaml alone is a failed start)."""
    found = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
    exported = ("pytorch_lora_weights.safetensors", "transformer", "vae", "latent_stats.json")
    found += [name for name in exported if (folder / name).exists()]
    if _nonempty_file(folder / "logs" / "metrics.jsonl"):
        found.append("logs/metrics.jsonl")
    return found


def _glob_names(folder: Path, *patterns: str) -> list[str]:
    return sorted({p.name for pattern in patterns for p in folder.glob(pattern)})


def find_output(folder: Path) -> tuple[str, list[str]] | None:
    """(verb, the files that show it) for the flowtrain output `folder` holds, or None (new, empty, other files)."""
    if not folder.is_dir():
        return None
    if (folder / DEMO_MARKER).exists():
        return "demo", [DEMO_MARKER, *_glob_names(folder, "demo_report.json", "samples.png")]
    kind = _json_field(folder / "manifest.json", "kind")
    raw = _glob_names(folder, "raw-[0-9][0-9][0-9][0-9][0-9].parquet")
    if kind == "flowtrain.raw" or raw:
        return "prepare", (["manifest.json"] if kind else []) + raw
    cache = _glob_names(folder, "cache-[0-9]*-[0-9]*.parquet", "precompute_state.json")
    if kind == "flowtrain.cache" or cache:
        return "precompute", (["manifest.json"] if kind else []) + cache
    run = _run_evidence(folder)
    if run:
        is_ae = _config_kind(folder) == "autoencoder" or (folder / "vae").is_dir()
        return ("autoencoder" if is_ae else "train"), run
    # not prompts.txt alone: a user may keep one (validation prompts) in a folder before anything ran there
    images = _glob_names(folder, "grid.png", "[0-9][0-9][0-9]_[0-9][0-9].png")
    if images:
        return "sample", images
    return None


def cache_is_finished(folder: Path) -> bool:
    """A precompute cache with its manifest (written last) is complete; without one it can be continued."""
    return _json_field(folder / "manifest.json", "kind") == "flowtrain.cache"


def resumes_in_place(resume: str | None, out: str | Path) -> bool:
    """`train --resume_from_checkpoint X` continues the run in `out`: `latest`, or one of `out`'s checkpoints. A
    checkpoint of another folder starts a new history, which must not be mixed into a run already in `out`."""
    if resume is None:
        return False
    return resume == "latest" or Path(resume).resolve().parent == Path(out).resolve()


def replaced_path(out: Path) -> Path:
    """Where `--overwrite` keeps the earlier output of `out` until the new output is complete."""
    return out.parent / f".{out.name}.replaced"


def _shown(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _check(out: Path, verb: str, flag: str, overwrite: bool, continuing: bool, how_to_continue: str | None) -> bool:
    """Raise OutputExistsError when `verb` may not write `out`; True when `--overwrite` must move earlier output."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{flag} {out} is a file, not a folder: give a folder")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputExistsError(f"{flag} {out}: {above} is a file, so no folder can be made there")
    found = find_output(out)
    if found is None:
        return False  # new, empty, or nothing flowtrain wrote: written in place, as always
    kind, evidence = found
    held = f"{flag} {out} holds {_WHAT[kind]} from `flowtrain {kind}` ({_shown(evidence)})"
    if kind != verb:
        raise OutputExistsError(
            f"{held}; `flowtrain {verb}` never writes over another verb's output, even with --overwrite. "
            f"Give another {flag}."
        )
    if continuing:
        return False
    if not overwrite:
        options = [how_to_continue] if how_to_continue else []
        options += [
            f"write to a new {flag}",
            "pass --overwrite to replace it (the old output is deleted only after the new one is complete)",
        ]
        raise OutputExistsError(
            f"{held}, and flowtrain does not destroy or mix with earlier output unless asked. Choose one: "
            + "; ".join(options)
            + "."
        )
    aside = replaced_path(out)
    if aside.exists():
        raise OutputExistsError(
            f"{flag} {out}: an earlier --overwrite of it did not finish, and the output it was replacing is in "
            f"{aside}. Move that back to {out}, or delete it, then run again."
        )
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise OutputExistsError(f"cannot --overwrite {flag} {out}: it holds the current folder; run from elsewhere")
    return True


@dataclass
class OutputSlot:
    """The folder a verb writes, claimed by `output_slot`. `replaced` holds the earlier output under --overwrite."""

    path: Path
    replaced: Path | None = None
    unfinished: bool = False  # set by a verb that stops early but resumably (train after SIGTERM): keep both

    def note(self) -> str:
        """A sentence for the verb's final message, when earlier output is still kept aside."""
        if self.replaced is None or not self.replaced.exists():
            return ""
        return f" The output it replaces is kept in {self.replaced} until you delete it."


@contextmanager
def output_slot(
    out: str | Path,
    verb: str,
    *,
    flag: str,
    overwrite: bool = False,
    continuing: bool = False,
    how_to_continue: str | None = None,
    keep_partial: Callable[[Path], bool] | None = None,
    enabled: bool = True,
) -> Iterator[OutputSlot]:
    """Claim `out` for `verb` (refusing earlier output, see the module doc); yield the slot; settle `--overwrite`.

    `continuing`: the user asked to continue the output that is there (it is written in place). `keep_partial(out)`:
    whether a failed run's new output is worth keeping over the restored old one. `enabled=False` (the non-main
    processes of a distributed run) claims nothing: only one process may move folders.
    """
    out = Path(out)
    slot = OutputSlot(out)
    if not enabled:
        yield slot
        return
    if _check(out, verb, flag, overwrite, continuing, how_to_continue):
        slot.replaced = replaced_path(out)
        out.rename(slot.replaced)  # atomic: the earlier output is whole, under one name or the other
        log.info("--overwrite: %s moved to %s until the new output is complete", out, slot.replaced)
    try:
        yield slot
    except BaseException:
        _settle_failure(slot, keep_partial)
        raise
    if slot.replaced is not None and not slot.unfinished:
        shutil.rmtree(slot.replaced)
        slot.replaced = None


def _settle_failure(slot: OutputSlot, keep_partial: Callable[[Path], bool] | None) -> None:
    if slot.replaced is None:
        return
    if keep_partial is not None and slot.path.exists() and keep_partial(slot.path):
        log.warning(
            "--overwrite %s did not complete, but the new run wrote a checkpoint and is kept there (resume it with "
            "--resume_from_checkpoint latest); the output it replaces is in %s until you delete it",
            slot.path,
            slot.replaced,
        )
        return
    if slot.path.exists():
        shutil.rmtree(slot.path)
    slot.replaced.rename(slot.path)
    log.warning(
        "--overwrite %s did not complete: the earlier output is back in place, as it was; what the failed run "
        "wrote (a report too) is removed",
        slot.path,
    )
    slot.replaced = None
