"""`flowtrain export`: a trained LoRA or full fine-tune written in the layout another tool loads (docs/export.md).

flowtrain trains on diffusers' module layout and saves there. Other tools (ComfyUI; the model makers' own code)
use the checkpoint's original layout, where some diffusers Linears are one fused Linear (e.g. q/k/v → `qkv`) and
some weights order their rows differently (the final AdaLN modulation: (shift, scale) vs diffusers' (scale,
shift)). This module holds the generic part:

    LoraModule / fuse_lora / swap_halves   pure tensor functions: one LoRA branch, exact q/k/v fusion, row order
    Layout / ModuleMap                     a family's diffusers → original module table (no family names here:
                                           each family package declares its own, `models/<family>/export.py`)
    lora_to_original / weights_to_original the table applied to a LoRA / to a full state dict
    read_lora, export, export_run          files in, files out (the CLI verb and `export.formats` at train end)

Formats (`FORMATS`):
    diffusers  the file training writes (`transformer.<module>.lora_A/B.weight` + adapter metadata), copied
    comfyui    original names under `diffusion_model.`, `lora_down` / `lora_up` + an `.alpha` per module: the
               trained A and B unchanged, ComfyUI scales by alpha / rank (`comfy/weight_adapter/lora.py`)
    original   original names under `diffusion_model.`, `lora_A` / `lora_B`, alpha / rank folded into lora_B and
               no `.alpha` keys: the form diffusers' own converters for non-diffusers LoRAs read (some reject
               `.alpha` keys), and ComfyUI reads too (scale 1 without `.alpha`)
A full fine-tune exports as one `.safetensors` in the original layout (`comfyui` and `original` are the same file:
bare original names, as the model makers publish their checkpoints) besides its diffusers `transformer/` folder.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "comfyui", "original")
ORIGINAL_PREFIX = "diffusion_model."  # what ComfyUI and diffusers' non-diffusers converters expect before a name
DIFFUSERS_PREFIX = "transformer."
LORA_FILE = "pytorch_lora_weights.safetensors"
TRANSFORMER_DIR = "transformer"


class ExportError(ValueError):
    """A source or a request `flowtrain export` cannot serve; the message names the file and what to do."""


# ---- pure tensor functions ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraModule:
    """One LoRA branch on a Linear: ΔW = up @ down · alpha / rank.

    down: A (r, in); up: B (out, r); alpha: the scale numerator (peft's lora_alpha)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW (out, in) in float32."""
        return (self.up.float() @ self.down.float()) * self.scale


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """Rows (a, b) → (b, a) along dim 0 (2h, ...) → (2h, ...): (scale, shift) ↔ (shift, scale). Its own inverse."""
    import torch

    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def fuse_lora(branches: Sequence[LoraModule | None], dims: Sequence[int]) -> LoraModule:
    """The exact LoRA of a Linear whose weight stacks the branches' weights by rows, W = [W_1; …; W_n].

    branches[i]: the LoRA of rows block i ((dims[i], in)), or None where that branch was not trained (its rows get
    no update). With R = Σ r_i over the present branches:
        down  = concat_i A_i                               (R, in)
        up    = block-diag(B_i · s_i / s)                  (Σ dims, R); zero rows for absent branches
        alpha = s · R, s = the first present branch's scale, so alpha / rank = s and row block i gets s_i·B_i·A_i
    With equal scales (one lora.alpha, one rank: alpha_fused = n·alpha for n branches) the B blocks are copied
    bit for bit. Reusing one branch's A for all (as some converters do) is exact only if the A_i are equal.
    """
    import torch

    present = [b for b in branches if b is not None]
    if not present or len(branches) != len(dims):
        raise ValueError("fuse_lora needs at least one branch and one row count per branch")
    s = present[0].scale
    ranks = sum(b.rank for b in present)
    ref = present[0].up
    up = torch.zeros(sum(dims), ranks, dtype=ref.dtype, device=ref.device)
    row = col = 0
    for b, rows in zip(branches, dims, strict=True):
        if b is not None:
            if b.up.shape[0] != rows:
                raise ValueError(f"a fused branch has {b.up.shape[0]} output rows where the layout expects {rows}")
            block = b.up if b.scale == s else (b.up.float() * (b.scale / s)).to(ref.dtype)
            up[row : row + rows, col : col + b.rank] = block
            col += b.rank
        row += rows
    down = torch.cat([b.down for b in present], dim=0)
    return LoraModule(down=down, up=up, alpha=s * ranks)


@dataclass(frozen=True)
class LohaModule:
    """One LoHa branch on a Linear (peft's `hada_*` tensors): ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / rank.

    w1a, w2a: (out, r); w1b, w2b: (r, in); alpha: peft's LoHa alpha (scale alpha / r, as ComfyUI's LoHa reads it
    with its `.alpha`)."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """ΔW (out, in) in float32."""
        return (self.w1a.float() @ self.w1b.float()) * (self.w2a.float() @ self.w2b.float()) * self.scale


def fuse_loha(branches: Sequence[LohaModule | None], dims: Sequence[int]) -> LohaModule:
    """The exact LoHa of a Linear whose weight stacks the branches' weights by rows (see `fuse_lora`).

    Each factor product fuses like a LoRA: w·a = block-diag(w·a_i), w·b = concat(w·b_i), so row block i of
    (w1a @ w1b) is branch i's W1_i and of (w2a @ w2b) its W2_i (zero rows for an absent branch); the Hadamard product
    works row by row, so row block i of the fused ΔW is W1_i ⊙ W2_i: branch i's ΔW. A scale other than the first
    branch's is folded into that branch's w1a block (ΔW is linear in it); alpha = s · R keeps alpha / rank = s."""
    import torch

    present = [b for b in branches if b is not None]
    if not present or len(branches) != len(dims):
        raise ValueError("fuse_loha needs at least one branch and one row count per branch")
    s, ranks, ref = present[0].scale, sum(b.rank for b in present), present[0].w1a
    w1a = torch.zeros(sum(dims), ranks, dtype=ref.dtype, device=ref.device)
    w2a = torch.zeros_like(w1a)
    row = col = 0
    for b, rows in zip(branches, dims, strict=True):
        if b is not None:
            if b.w1a.shape[0] != rows:
                raise ValueError(f"a fused branch has {b.w1a.shape[0]} output rows where the layout expects {rows}")
            w1a[row : row + rows, col : col + b.rank] = b.w1a if b.scale == s else (b.w1a.float() * (b.scale / s))
            w2a[row : row + rows, col : col + b.rank] = b.w2a
            col += b.rank
        row += rows
    w1b = torch.cat([b.w1b for b in present], dim=0)
    w2b = torch.cat([b.w2b for b in present], dim=0)
    return LohaModule(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, alpha=s * ranks)


def _swap_rows(m: LoraModule | LohaModule) -> LoraModule | LohaModule:
    """The branch with its ΔW's two row halves exchanged: the halves of B (LoRA) or of both w·a (LoHa)."""
    if isinstance(m, LohaModule):
        return LohaModule(swap_halves(m.w1a), m.w1b, swap_halves(m.w2a), m.w2b, m.alpha)
    return LoraModule(down=m.down, up=swap_halves(m.up), alpha=m.alpha)


Branch = LoraModule | LohaModule  # the adapter kinds the original layout can hold


# ---- a family's layout --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleMap:
    """diffusers module(s) → one original module. Names may hold `{i}`, a block index.

    how: "rename" (one module, same weight), "fuse" (the diffusers modules' weights stacked by rows, in this
    order, are the original's), "swap" (one module whose two row halves are in the other order).
    dims: for "fuse", each branch's output rows given the shared input width (a branch the LoRA did not train
    still occupies its rows)."""

    diffusers: tuple[str, ...]
    original: str
    how: Literal["rename", "fuse", "swap"] = "rename"
    dims: Callable[[int], tuple[int, ...]] | None = None
    note: str = ""


@dataclass(frozen=True)
class Layout:
    """A family's diffusers → original layout.

    modules: every Linear LoRA can target, and every Linear of a full state dict; params: the other weights of a
    full state dict (norm scales), diffusers parameter name → original (names with `{i}`). identity: the original
    layout is diffusers' own (no table); sources: where the table comes from (for docs/export.md)."""

    modules: tuple[ModuleMap, ...] = ()
    params: Mapping[str, str] = field(default_factory=dict)
    identity: bool = False
    sources: tuple[str, ...] = ()

    def find(self, name: str) -> tuple[int, int, str | None] | None:
        """(map index, branch index, block index) of diffusers module `name`, or None."""
        for mi, mm in enumerate(self.modules):
            for bi, pattern in enumerate(mm.diffusers):
                m = _regex(pattern).fullmatch(name)
                if m:
                    return mi, bi, m.groupdict().get("i")
        return None


@functools.cache
def _regex(pattern: str) -> re.Pattern[str]:
    """A table name with `{i}` → a regex whose group `i` is the block index."""
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)"))


def _name(pattern: str, i: str | None) -> str:
    return pattern if i is None else pattern.replace("{i}", i)


def lora_to_original(modules: Mapping[str, Branch], layout: Layout) -> dict[str, Branch]:
    """{diffusers module: LoRA or LoHa} → {original module: the same kind} with fused q/k/v (`fuse_lora`,
    `fuse_loha`) and swapped row halves; every module's ΔW mapped onto the original weight equals the diffusers ΔW
    mapped there (tests/export)."""
    if layout.identity:
        return dict(modules)
    groups: dict[tuple[int, str | None], dict[int, LoraModule]] = {}
    for name, mod in modules.items():
        hit = layout.find(name)
        if hit is None:
            raise ExportError(f"LoRA module {name!r} has no original-layout name in this family's table "
                              "(docs/export.md); export it with --format diffusers")  # fmt: skip
        mi, bi, i = hit
        groups.setdefault((mi, i), {})[bi] = mod
    out: dict[str, LoraModule] = {}
    for (mi, i), branches in groups.items():
        mm = layout.modules[mi]
        target = _name(mm.original, i)
        if mm.how == "fuse":
            assert mm.dims is not None
            ordered = [branches.get(b) for b in range(len(mm.diffusers))]
            first = next(b for b in ordered if b is not None)
            if isinstance(first, LohaModule):
                out[target] = fuse_loha(ordered, mm.dims(first.w1b.shape[1]))  # type: ignore[arg-type]
            else:
                out[target] = fuse_lora(ordered, mm.dims(first.down.shape[1]))  # type: ignore[arg-type]
        elif mm.how == "swap":
            out[target] = _swap_rows(branches[0])
        else:
            out[target] = branches[0]
    return out


def weights_to_original(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """A full diffusers transformer state dict → the original layout's (the inverse of diffusers' single-file
    checkpoint converter for the family): renamed, fused inputs (q/k/v, or q/k/v plus an MLP input) concatenated
    by rows (weights (out_i, in) → (Σ out_i, in), biases (out_i,) → (Σ out_i,)), the final modulation's halves
    swapped, norm scales renamed. Tensors that are only renamed are the same objects (no copy)."""
    import torch

    if layout.identity:
        return dict(state)
    params = {_regex(k): v for k, v in layout.params.items()}
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str | None, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        p = next(((rx, v) for rx, v in params.items() if rx.fullmatch(key)), None)
        if p is not None:
            out[_name(p[1], p[0].fullmatch(key).groupdict().get("i"))] = value  # type: ignore[union-attr]
            continue
        module, _, suffix = key.rpartition(".")
        hit = layout.find(module)
        if hit is None:
            raise ExportError(f"transformer weight {key!r} has no original-layout name in this family's table "
                              "(docs/export.md)")  # fmt: skip
        mi, bi, i = hit
        mm = layout.modules[mi]
        target = f"{_name(mm.original, i)}.{suffix}"
        if mm.how == "fuse":
            fused.setdefault((mi, i, suffix), {})[bi] = value
        elif mm.how == "swap":
            out[target] = swap_halves(value)
        else:
            out[target] = value
    for (mi, i, suffix), parts in fused.items():
        mm = layout.modules[mi]
        if len(parts) != len(mm.diffusers):
            missing = [_name(mm.diffusers[b], i) for b in range(len(mm.diffusers)) if b not in parts]
            raise ExportError(f"transformer weights lack {', '.join(missing)} ({suffix}) to build "
                              f"{_name(mm.original, i)}")  # fmt: skip
        out[f"{_name(mm.original, i)}.{suffix}"] = torch.cat([parts[b] for b in range(len(parts))], dim=0)
    return out


# ---- the formats --------------------------------------------------------------------------------------------------
def comfyui_state(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """{original module: LoRA} → ComfyUI's keys: `diffusion_model.<m>.lora_down.weight` (A), `.lora_up.weight`
    (B), `.alpha` (0-d float32)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        key = ORIGINAL_PREFIX + name
        out[f"{key}.lora_down.weight"] = m.down.contiguous()
        out[f"{key}.lora_up.weight"] = m.up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def comfyui_loha_state(modules: Mapping[str, LohaModule]) -> dict[str, torch.Tensor]:
    """{original module: LoHa} → ComfyUI's LoHa keys (`comfy/weight_adapter/loha.py`):
    `diffusion_model.<m>.hada_w1_a` / `hada_w1_b` / `hada_w2_a` / `hada_w2_b` (peft's tensors unchanged) and
    `.alpha` (0-d float32; ComfyUI scales by alpha / w1_b's rows, the rank)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        key = ORIGINAL_PREFIX + name
        for part in ("w1a", "w1b", "w2a", "w2b"):
            out[f"{key}.hada_{part[:2]}_{part[2]}"] = getattr(m, part).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def original_state(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """{original module: LoRA} → `diffusion_model.<m>.lora_A.weight` (A), `.lora_B.weight` (B · alpha/rank, in
    float32 then B's dtype); no `.alpha`: a loader without alpha uses scale 1, which is then exact."""
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        key = ORIGINAL_PREFIX + name
        out[f"{key}.lora_A.weight"] = m.down.contiguous()
        up = m.up if m.scale == 1.0 else (m.up.float() * m.scale).to(m.up.dtype)
        out[f"{key}.lora_B.weight"] = up.contiguous()
    return out


# ---- reading a flowtrain / diffusers LoRA --------------------------------------------------------------------------
_LORA_KEY = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_KINDS = (  # key fragments of adapters other than plain LoRA, and what to call them
    ("lora_magnitude_vector", "DoRA"),
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("lora_B.bias", "LoRA with a bias (lora_bias)"),
)


def _metadata(path: Path) -> dict:
    """The adapter config diffusers writes into the file's header (`lora_adapter_metadata`), keys without their
    `transformer.` prefix; {} when there is none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    data = json.loads(raw)
    return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in data.items()}


def lora_kind(keys: Sequence[str], meta: Mapping) -> str:
    """ "LoRA" for plain A/B adapters, else the adapter kind the keys or metadata show (DoRA, LoHa, …)."""
    for fragment, kind in _KINDS:
        if any(fragment in k for k in keys):
            return kind
    return "DoRA" if meta.get("use_dora") else "LoRA"


def _pattern_value(module: str, patterns: Mapping[str, float], default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors, adapter metadata, kind) of a flowtrain / diffusers adapter file; ExportError for a file that is
    not one."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ExportError(f"{path}: not a safetensors file ({e}); give a LoRA file or a run folder") from None
    keys = list(state)
    if not any(k.startswith(DIFFUSERS_PREFIX) and any(f in k for f in (".lora", ".hada_", ".lokr_")) for k in keys):
        raise ExportError(f"{path}: not a flowtrain / diffusers LoRA (no `transformer.*.lora_A/B` keys; found e.g. "
                          f"{keys[:2]}); give the pytorch_lora_weights.safetensors a training run wrote")  # fmt: skip
    meta = _metadata(path)
    return state, meta, lora_kind(keys, meta)


def read_lora(path: str | Path) -> dict[str, LoraModule]:
    """A flowtrain / diffusers LoRA file → {diffusers module: LoraModule}, alphas from its adapter metadata (none:
    alpha = rank, as diffusers loads it). Raises ExportError for a file that is not one or a kind other than
    plain LoRA."""
    path = Path(path)
    state, meta, kind = load_lora_file(path)
    if kind != "LoRA":
        also = " (and LoHa in comfyui)" if kind == "LoHa" else ""
        raise ExportError(f"{path} is a {kind} adapter; the comfyui and original formats hold plain LoRA (A, B, "
                          f"alpha){also} only: export it with --format diffusers")  # fmt: skip
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = _LORA_KEY.fullmatch(k)
        if m is None:
            raise ExportError(f"{path}: unexpected key {k!r} in a diffusers LoRA file; give a flowtrain LoRA")
        pairs.setdefault(m["module"], {})[m["ab"]] = v
    if not meta:
        log.warning("%s has no adapter metadata: alpha = rank is assumed, as diffusers does", path)
    alpha, alphas = meta.get("lora_alpha"), meta.get("alpha_pattern") or {}
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{path}: module {module!r} has lora_{next(iter(ab))} but not its pair")
        rank = ab["A"].shape[0]
        a = _pattern_value(module, alphas, rank if alpha is None else alpha)
        out[module] = LoraModule(down=ab["A"], up=ab["B"], alpha=float(a))
    return out


_LOHA_KEY = re.compile(r"transformer\.(?P<module>.+)\.hada_(?P<part>w[12]_[ab])")


def read_loha(path: str | Path) -> dict[str, LohaModule]:
    """A flowtrain / diffusers LoHa file → {diffusers module: LohaModule}, alphas from its adapter metadata (peft's
    `alpha`, `alpha_pattern`)."""
    path = Path(path)
    state, meta, kind = load_lora_file(path)
    if kind != "LoHa":
        raise ExportError(f"{path} is a {kind} adapter, not LoHa")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = _LOHA_KEY.fullmatch(k)
        if m is None:
            raise ExportError(f"{path}: unexpected key {k!r} in a LoHa file (hada_t1/t2 are for convolutions)")
        parts.setdefault(m["module"], {})[m["part"]] = v
    alpha, alphas = meta.get("alpha"), meta.get("alpha_pattern") or {}
    out = {}
    for module, p in parts.items():
        if set(p) != {"w1_a", "w1_b", "w2_a", "w2_b"}:
            raise ExportError(f"{path}: module {module!r} lacks some of hada_w1_a/w1_b/w2_a/w2_b")
        rank = p["w1_b"].shape[0]
        a = _pattern_value(module, alphas, rank if alpha is None else alpha)
        out[module] = LohaModule(p["w1_a"], p["w1_b"], p["w2_a"], p["w2_b"], alpha=float(a))
    return out


# ---- files --------------------------------------------------------------------------------------------------------
def _family_of(source: Path, family: str | None) -> str:
    """`family`, else the `model.family` (or the family detected from `model.pretrained`) of the config.yaml in
    the run folder the source is or lies in."""
    if family is not None:
        return family
    folder = source if source.is_dir() else source.parent
    for d in (folder, folder.parent):
        cfg = d / "config.yaml"
        if cfg.exists():
            import yaml

            from flowtrain.models import detect_family

            model = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("model") or {}
            name = model.get("family") or (detect_family(model["pretrained"])[0] if model.get("pretrained") else None)
            if name:
                return name
    from flowtrain.models import family_names

    raise ExportError(f"{source}: no run config.yaml next to it names its model family; pass --family "
                      f"({', '.join(family_names())})")  # fmt: skip


def layout_of(family: str) -> Layout:
    """The family's original layout (`ExportsOriginal.export_layout`)."""
    from flowtrain.models import get_family
    from flowtrain.models.base import ExportsOriginal

    fam = get_family(family)
    if not isinstance(fam, ExportsOriginal):
        raise ExportError(f"model family {family!r} declares no original layout; only --format diffusers exports it")
    return fam.export_layout


def _save(state: Mapping[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a kill mid-write leaves no truncated file under the final name."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file(dict(state), str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _source(path: Path) -> tuple[str, Path]:
    """("lora", file) or ("full", transformer folder) for a LoRA file or a run folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; give a run folder or a LoRA .safetensors file")
    if path.is_file():
        return "lora", path
    if (path / LORA_FILE).is_file():
        return "lora", path / LORA_FILE
    if (path / TRANSFORMER_DIR / "config.json").is_file():
        return "full", path / TRANSFORMER_DIR
    raise ExportError(f"{path} holds neither {LORA_FILE} nor a {TRANSFORMER_DIR}/ folder: give the output_dir of a "
                      "finished training run (or a LoRA file)")  # fmt: skip


def default_out(kind: str, src: Path, fmt: str) -> Path:
    """Where an export goes without --out: next to its source, the format in the name."""
    if fmt == "diffusers":
        return src  # what training wrote is already diffusers format
    if kind == "full":
        return src.parent / f"{TRANSFORMER_DIR}.{fmt}.safetensors"
    return src.with_name(f"{src.name.removesuffix('.safetensors')}.{fmt}.safetensors")


def export(
    source: str | Path, fmt: str, out: str | Path | None = None, *, family: str | None = None, overwrite: bool = False
) -> Path:
    """Write `source` (a run folder, or a LoRA file) in format `fmt`; returns the file (or folder) written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    kind, src = _source(Path(source))
    target = Path(out) if out is not None else default_out(kind, src, fmt)
    if out is not None and target.is_dir() and not (kind == "full" and fmt == "diffusers"):
        target = target / default_out(kind, src, fmt).name  # --out an existing folder: the default name in it
    if target.resolve() == src.resolve():
        if kind == "lora":
            load_lora_file(src)  # still refuse a file that is no flowtrain / diffusers LoRA
        log.info("%s is already in %s format", src, fmt)
        return src
    if target.exists() and not overwrite:
        raise ExportError(f"--out {target} exists; give another --out or pass --overwrite to replace it")
    if kind == "lora" and fmt == "diffusers":
        load_lora_file(src)  # any adapter kind diffusers wrote; a file that is no such adapter is refused
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
        return target
    if kind == "full" and fmt == "diffusers":
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target
    layout = layout_of(_family_of(src, family))
    if kind == "lora" and fmt == "comfyui" and load_lora_file(src)[2] == "LoHa":
        state = comfyui_loha_state(lora_to_original(read_loha(src), layout))  # type: ignore[arg-type]
    elif kind == "lora":
        modules = lora_to_original(read_lora(src), layout)
        state = comfyui_state(modules) if fmt == "comfyui" else original_state(modules)  # type: ignore[arg-type]
    else:
        state = weights_to_original(_read_folder(src), layout)
    _save(state, target, {"format": f"flowtrain-export-{fmt}"})
    log.info("export: %s (%s, %d tensors) → %s", src, fmt, len(state), target)
    return target


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers model folder's weights (one or several .safetensors shards) as one state dict."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no .safetensors weights; export needs the safetensors a run writes")
    state: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="export: reading weights", unit="file", disable=len(files) < 2):
        state.update(load_file(str(f)))
    return state


def export_run(run_dir: str | Path, formats: Sequence[str], family: str) -> list[Path]:
    """`export.formats` at the end of training: every listed format of the run's final weights, replacing the
    previous export of a resumed run (derived files of the same run)."""
    return [export(run_dir, fmt, family=family, overwrite=True) for fmt in formats]


def double_block_qkv(widths: Callable[[int], tuple[int, ...]]) -> tuple[ModuleMap, ModuleMap]:
    """The two fused q/k/v maps of a double-stream block that diffusers' MMDiT naming (`attn.to_q` …,
    `attn.add_q_proj` …) and the original `double_blocks.{i}.{img,txt}_attn.qkv` share: one table entry each,
    written once for every family with that layout. `widths(hidden)` gives the rows of q, k and v."""
    block = "transformer_blocks.{i}.attn"
    return (
        ModuleMap(
            (f"{block}.to_q", f"{block}.to_k", f"{block}.to_v"), "double_blocks.{i}.img_attn.qkv", "fuse", widths
        ),
        ModuleMap(
            (f"{block}.add_q_proj", f"{block}.add_k_proj", f"{block}.add_v_proj"),
            "double_blocks.{i}.txt_attn.qkv",
            "fuse",
            widths,
        ),
    )
