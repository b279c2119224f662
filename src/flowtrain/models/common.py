"""Helpers the families share: loading (components, transformer, sampling pipeline), resolution checks, the
scheduler's resolution shift, identity hashing, caption dropout, LoRA saving, tiny tokenizers, image scaling.

Nothing here names a family; each function takes the diffusers class or folder it works on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from flowtrain.models.base import ModelPathError
from flowtrain.models.paths import check_model_path, is_local, subfolder_if_exists

log = logging.getLogger(__name__)


def load_component(cls: Any, pretrained: str, subfolder: str, *, dtype: torch.dtype, weights: str | None,
                   key: str, revision: str | None = None) -> Any:  # fmt: skip
    """A diffusers model (`cls`, e.g. a transformer class) from `pretrained`'s `subfolder`, or from `weights`: a
    diffusers folder (pipeline or component) or a single .safetensors file (BFL or diffusers key layout; the
    architecture then comes from `pretrained`). Weights load from safetensors only, never from pickle files."""
    if weights is None:
        check_model_path(pretrained, "model.pretrained", need=f"{subfolder}/config.json")
        return cls.from_pretrained(
            pretrained, subfolder=subfolder, dtype=dtype, revision=revision, use_safetensors=True
        )
    path = Path(weights)
    check_model_path(weights, key)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{key}={weights!r}: only .safetensors weight files are loaded (pickle-based .ckpt/.pt/.bin can run "
                "code); convert it to safetensors first"
            )
        return cls.from_single_file(str(path), config=pretrained, subfolder=subfolder, torch_dtype=dtype)
    return cls.from_pretrained(weights, subfolder=subfolder_if_exists(path, subfolder), dtype=dtype,
                               use_safetensors=True)  # fmt: skip


def load_pretrained_vae(cls: Any, pretrained: str) -> torch.nn.Module:
    """An autoencoder config's `model.pretrained` (`flowtrain autoencoder`), as `cls`, float32, safetensors only:
    a VAE folder (config.json in it), a pipeline folder (its vae/, as an autoencoder stage's folder is), or a hub
    id of a pipeline (its vae/ subfolder)."""
    if not is_local(pretrained):
        return cls.from_pretrained(pretrained, subfolder="vae", dtype=torch.float32, use_safetensors=True)
    check_model_path(pretrained, "model.pretrained")
    path = Path(pretrained).expanduser()
    sub = subfolder_if_exists(path, "vae")
    if sub is None and not (path / "config.json").is_file():
        raise ModelPathError(
            f"model.pretrained={pretrained!r} is neither a VAE folder (config.json) nor a pipeline folder with "
            "vae/config.json; point it at the VAE you want to start from"
        )
    return cls.from_pretrained(path, subfolder=sub, dtype=torch.float32, use_safetensors=True)


def load_pipeline(cls: Any, model: Any, *, dtype: torch.dtype, example: str = "", **components: Any) -> Any:
    """`cls.from_pretrained(model.pretrained)` with safetensors only, `components` overriding (None leaves one out),
    and a clear error for a path that is not a pipeline."""
    check_model_path(model.pretrained, "model.pretrained", need="model_index.json", example=example)
    try:
        return cls.from_pretrained(
            model.pretrained,
            dtype=dtype,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            use_safetensors=True,  # never fall back to pickle weights
            **components,
        )
    except OSError as e:  # diffusers / hub report a missing model as OSError
        raise FileNotFoundError(f"could not load the pipeline model.pretrained={model.pretrained!r}: {e}") from e


def load_transformer(cls: Any, model: Any, *, dtype: torch.dtype, weights: str | None) -> Any:
    """The transformer (`cls`) of `model.pretrained`, or from `weights` (a pipeline / transformer folder or a
    .safetensors file with `model.pretrained`'s architecture, see `load_component`); errors name `model.dit` when
    `weights` is it."""
    key = "model.dit" if weights is not None and weights == model.dit else "weights"
    return load_component(cls, model.pretrained, "transformer", dtype=dtype, weights=weights, key=key,
                          revision=model.revision)  # fmt: skip


def sampling_pipeline(family: Any, pipeline_cls: Any, model: Any, *, dtype: torch.dtype, device: torch.device | str,
                      transformer: str | None = None, lora: str | None = None, example: str = "") -> Any:  # fmt: skip
    """`ModelFamily.sampling_pipeline`: the pipeline of `model.pretrained` with the transformer of `transformer` (a
    full fine-tune) or else `model.dit` swapped in, loaded through `family.load_transformer` (so a single
    .safetensors `model.dit` works too, and the family's checks run), the LoRA `lora` loaded, on `device`, without a
    progress bar. Without either the pipeline's own transformer is used."""
    weights = transformer or model.dit
    parts = {} if weights is None else {"transformer": family.load_transformer(model, dtype=dtype, weights=weights)}
    pipe = load_pipeline(pipeline_cls, model, dtype=dtype, example=example, **parts)
    if lora is not None:
        load_lora(pipe, lora, model.pretrained)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def block_downsampling(vae_config: Mapping[str, Any]) -> int:
    """The spatial downsampling of an `AutoencoderKL`-style VAE: 2 per block but the last (the pipelines'
    `vae_scale_factor = 2 ** (len(block_out_channels) - 1)`)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def pixel_multiple(vae_cls: Any, model: Any, downsampling: Callable[[Mapping[str, Any]], int] = block_downsampling,
                   *, example: str = "") -> int:  # fmt: skip
    """`ModelFamily.pixel_multiple`: the VAE's spatial downsampling (`downsampling` of its config.json, as the
    pipeline computes its `vae_scale_factor`) × the 2×2 latent patch; reads the VAE's config only."""
    check_model_path(model.pretrained, "model.pretrained", need="vae/config.json", example=example)
    cfg = vae_cls.load_config(model.pretrained, subfolder="vae", revision=model.revision)
    return downsampling(cfg) * 2


def check_resolution(pipe: Any, resolution: int) -> None:
    """A square training `resolution` must be a multiple of the pipeline's `vae_scale_factor` × the 2×2 patch."""
    multiple = pipe.vae_scale_factor * 2
    if resolution % multiple:
        raise ValueError(
            f"resolution {resolution} is not a multiple of {multiple} (VAE factor × 2×2 latent patch): use e.g. "
            f"{max(multiple, resolution // multiple * multiple)}"
        )


# ---- timestep shift -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _read_scheduler_config(pretrained: str, revision: str | None) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(FlowMatchEulerDiscreteScheduler.load_config(pretrained, subfolder="scheduler", revision=revision))


def scheduler_config(model: Any) -> dict[str, Any]:
    """`scheduler/scheduler_config.json` of `model.pretrained`, read once per model (`resolution_shift` may be asked
    every step). A family whose shift or sampler reads it calls this in `check_cache`, so a pipeline folder without
    it fails before training, with a `ModelPathError` naming the folder and the file."""
    where = f"model.pretrained={model.pretrained!r}"
    need = "scheduler/scheduler_config.json"
    check_model_path(model.pretrained, "model.pretrained", need="model_index.json")
    try:
        config = _read_scheduler_config(model.pretrained, model.revision)
    except OSError as e:  # diffusers / the hub report a missing file as OSError
        why = "is missing" if is_local(model.pretrained) else f"could not be read ({e})"
        raise ModelPathError(
            f"{where}: {need} {why}; the timestep shift (timesteps.shift_mode: resolution) and the sampler read the "
            "scheduler's config. Point model.pretrained at the whole diffusers pipeline folder (or hub id) that "
            "holds model_index.json and scheduler/"
        ) from e
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"{where}: {need} has time_shift_type={kind!r}; the scheduler knows exponential and linear")
    return config


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:  # fmt: skip
    """μ linear in the packed image-token count; diffusers' `calculate_shift` (FluxPipeline, QwenImagePipeline and
    others), with its defaults and in its order of operations, so the value is the same to the last bit."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return float(image_seq_len * m + b)


def scheduler_shift(num_tokens: int, config: Mapping[str, Any]) -> float:
    """The fixed σ-shift s (σ' = sσ / (1 + (s-1)σ)) equal to what a pipeline's `FlowMatchEulerDiscreteScheduler`
    with this `config` applies at `num_tokens` packed image tokens.

    With dynamic shifting the pipeline computes μ = `calculate_shift(N, base_image_seq_len, max_image_seq_len,
    base_shift, max_shift)` and the scheduler shifts σ by `time_shift(μ, 1, σ)`: exponential e^μ / (e^μ + 1/σ - 1),
    which is the s-shift with s = e^μ, or linear μ / (μ + 1/σ - 1), s = μ. Without it the scheduler applies its
    static `shift`. (`shift_terminal` then stretches the inference ladder to end at that σ; it belongs to the step
    ladder, not to a training density, and is not part of s.)
    """
    if not config.get("use_dynamic_shifting", False):
        return float(config.get("shift", 1.0))
    mu = calculate_shift(
        num_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return float(mu) if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


# ---- identity -----------------------------------------------------------------------------------------------------
_WINDOWS, _WINDOW = 16, 1 << 20  # sampled windows of a large weight file, bytes each


def weights_digest(path: Path) -> str:
    """A content digest of a weight file that costs the same for 100 MB as for 20 GB: its size, the safetensors
    header (tensor names, dtypes, shapes, offsets) and 16 windows of 1 MiB spread evenly over the data. Files under
    32 MiB are hashed whole. Two files that differ in any trained weight almost surely differ in some window;
    hashing 20 GB whole would take a minute at every `train` start."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        if size <= 2 * _WINDOWS * _WINDOW:
            h.update(f.read())
            return h.hexdigest()[:16]
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if path.suffix == ".safetensors" else 0
        h.update(head + f.read(min(header_len, 64 << 20)))
        for i in range(_WINDOWS):
            f.seek(i * (size - _WINDOW) // (_WINDOWS - 1))
            h.update(f.read(_WINDOW))
    return h.hexdigest()[:16]


def _component_dir(pretrained: str, subfolder: str, revision: str | None) -> Path | None:
    """The local folder of one pipeline component (a hub id: its snapshot in the local cache), or None."""
    p = Path(pretrained).expanduser()
    if p.is_dir():
        d = p / subfolder
        return d if d.is_dir() else None
    if is_local(pretrained):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(pretrained, revision=revision, allow_patterns=[f"{subfolder}/*"],
                                      local_files_only=True)) / subfolder  # fmt: skip
    except Exception:  # not downloaded here: nothing to compare against
        return None


def check_cache_origin(family: Any, model: Any, manifest: Any, *, allow_other_weights: bool = False) -> None:
    """The part of `ModelFamily.check_cache` every family shares: the cache was written by this family, with the
    model's cache settings, by encoders / a VAE of the same identity (see `data.manifest.check_made_for`)."""
    from flowtrain.data.manifest import check_made_for, warn_once

    unverified = check_made_for(
        manifest, family.name, family.cache_settings(model), family.identity(model),
        allow_other_weights=allow_other_weights,
    )  # fmt: skip
    if unverified:
        warn_once(
            f"cache check: the weights of {', '.join(unverified)} could not be compared with the cache's (not "
            f"available locally for {model.pretrained!r})"
        )


def check_input_widths(manifest: Any, transformer: torch.nn.Module, *, text: str, latents: str) -> None:
    """The `check_cache` part that needs the transformer: the cached `text` column's width is its
    `joint_attention_dim`, and the `latents` column's channels (posterior mean ‖ logvar, 2C) packed 2×2 into tokens
    (4C) are its `in_channels`."""
    text_dim, latent_ch = manifest.column(text).shape[-1], manifest.column(latents).shape[0] // 2 * 4
    tc = transformer.config
    if tc.joint_attention_dim != text_dim or tc.in_channels != latent_ch:
        raise ValueError(
            f"{manifest.where}: cached text width {text_dim} / packed latent channels {latent_ch} do not fit the "
            f"transformer (joint_attention_dim={tc.joint_attention_dim}, in_channels={tc.in_channels}): wrong "
            "model for this cache"
        )


def component_identity(pretrained: str, subfolders: list[str], revision: str | None = None) -> dict[str, str]:
    """{component: digest over its files (configs, tokenizer files, weights; see `weights_digest`)}, for the
    components whose files are available locally (a folder, or a hub id already in the local cache)."""
    out: dict[str, str] = {}
    for sub in subfolders:
        d = _component_dir(pretrained, sub, revision)
        if d is not None and d.is_dir():
            files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(d.iterdir()) if f.is_file())
            out[sub] = _folder_digest(str(d.resolve()), files)
    return out


@functools.lru_cache(maxsize=64)
def _folder_digest(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    """Digest of a component folder; computed once per process for an unchanged listing (name, size, mtime), since
    the instance cache, the class cache and resume each check the same model."""
    h = hashlib.sha256()
    for name, _, _ in files:
        h.update(name.encode() + weights_digest(Path(folder) / name).encode())
    return h.hexdigest()[:16]


# ---- conditioning -------------------------------------------------------------------------------------------------
def drop_fixed(
    cond: dict[str, torch.Tensor], empty: Mapping[str, torch.Tensor], drop: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Caption dropout over fixed-shape conditioning: rows where `drop` (B,) is True take `empty` (batch of 1)."""
    out = {}
    for k, t in cond.items():
        mask = drop.view(-1, *([1] * (t.ndim - 1)))
        out[k] = torch.where(mask, empty[k].to(t), t)
    return out


def rows_of(padded: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """(B, L, ...) padded + (B, L) bool mask (None: every row full) → B tensors (L_i, ...) of the real positions."""
    if mask is None:
        return list(padded.unbind(0))
    mask = mask.to(device=padded.device, dtype=torch.bool)
    return [row[m] for row, m in zip(padded.unbind(0), mask.unbind(0), strict=True)]


def pad_rows(rows: list[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B tensors (L_i, ...) → zero-padded (B, L, ...) and a (B, L) bool mask (True on real positions), L = `length`
    or else the longest row.

    Padding at the end keeps every real token at its own position index, so rotary position embeddings that
    assign positions by index see a padded row exactly as they see it alone."""
    longest = max(max(r.shape[0] for r in rows), length or 0)
    first = rows[0]
    out = first.new_zeros(len(rows), longest, *first.shape[1:])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=first.device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def drop_rows(
    padded: torch.Tensor, mask: torch.Tensor | None, empty: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption dropout over a variable-length column: rows where `drop` (B,) is True become `empty` (L_e, ...), and
    the batch is re-padded to its new longest row; a batch padded beyond its longest row (to the column's maximum,
    for `train.compile`) keeps that length, so it keeps its one shape. Returns (padded, bool mask)."""
    empty = empty.to(device=padded.device, dtype=padded.dtype)
    rows = [empty if d else r for r, d in zip(rows_of(padded, mask), drop.tolist(), strict=True)]
    fixed = mask is not None and int(mask.sum(1).max()) < padded.shape[1]
    return pad_rows(rows, length=padded.shape[1] if fixed else None)


# ---- weights ------------------------------------------------------------------------------------------------------
def save_lora_with(pipeline_cls: Any, output_dir: str | Path, transformer: torch.nn.Module, lora_config: Any) -> Path:
    """Write `pytorch_lora_weights.safetensors` with the pipeline class's own `save_lora_weights`, in diffusers
    format and with the adapter metadata: without it diffusers reloads alpha = rank and the LoRA changes scale."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls.save_lora_weights(
        str(output_dir),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=lora_config.to_dict(),
    )
    return Path(output_dir) / "pytorch_lora_weights.safetensors"


def save_full(output_dir: str | Path, transformer: torch.nn.Module) -> Path:
    """A full fine-tune as a diffusers `transformer/` folder under `output_dir`."""
    path = Path(output_dir) / "transformer"
    transformer.save_pretrained(path)
    return path


def save_pipeline_once(path: str | Path, build: Callable[[], Any]) -> Path:
    """Write the pipeline `build()` makes to `path` (`save_pretrained`), unless a pipeline folder is already there
    (tiny pipelines: tests and demos build each once)."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        build().save_pretrained(path)
    return path


@contextlib.contextmanager
def transformer_in(pipe: Any, transformer: torch.nn.Module) -> Iterator[Any]:
    """`pipe` with `transformer` registered for the block (a pipeline loaded without one samples with it)."""
    pipe.register_modules(transformer=transformer)
    try:
        yield pipe
    finally:
        pipe.register_modules(transformer=None)


def load_lora(pipe: Any, path: str, model: str = "") -> None:
    """Load a LoRA file (or a folder holding one) into `pipe`; the caller has checked the path. Refuses a
    diffusers-format file that names modules the transformer lacks (peft would drop them silently)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from flowtrain.weights_check import adapter_kind, check_lora_applied, lora_file, lora_modules, safetensors_keys

    file = lora_file(path)
    if adapter_kind(file) == "loha":  # diffusers 0.42 loads LoRA, DoRA and LoKr files itself, but not LoHa
        load_adapter_with_peft(pipe.transformer, file)
    else:
        pipe.load_lora_weights(path, use_safetensors=True)
    # The injected adapter modules start in training mode, so a LoRA trained with dropout (lora.dropout,
    # rank_dropout, module_dropout) would drop activations while sampling; inference is eval mode.
    pipe.transformer.eval()
    wanted = lora_modules(safetensors_keys(file, "--lora"))
    adapted = {name for name, m in pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    check_lora_applied(path, model, wanted, adapted)


def load_adapter_with_peft(transformer: torch.nn.Module, path: Path, adapter_name: str = "default_0") -> None:
    """Load a diffusers-format adapter file of any peft kind into `transformer` through peft itself: the peft
    config saved in the file's header (`lora_adapter_metadata`) is injected, then the tensors are set. For kinds
    diffusers' `load_lora_weights` does not read (LoHa); this is also how to load such a file by hand."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from flowtrain.weights_check import adapter_metadata

    meta = adapter_metadata(path)
    if not meta:
        raise ValueError(f"{path}: a LoHa / LoKr file needs its adapter config (lora_adapter_metadata) in the header")
    inject_adapter_in_model(PeftConfig.from_peft_type(**meta), transformer, adapter_name=adapter_name)
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors fit no adapter module, e.g. {unexpected[:3]}")


# ---- tiny pipelines -----------------------------------------------------------------------------------------------
def train_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str], pre_tokenizer: Any = None
              ) -> tuple[dict[str, int], list[tuple[str, str]]]:  # fmt: skip
    """(vocab, merges) of a byte-level BPE trained on `corpus`, for a tiny pipeline's tokenizer (offline).
    `pre_tokenizer`: how the real tokenizer splits text before BPE (default: plain byte-level)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]  # "a b" strings fail
    return spec["vocab"], merges


# ---- images -------------------------------------------------------------------------------------------------------
def preprocess_images(
    pipe: Any, images: list[Any], resolution: int, *, scale_first: bool = False, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """`ModelFamily.preprocess_images` through the pipeline's own image processor in "crop" mode: PIL images →
    (B, 3, H, W) in [-1, 1] (H = W = res, or `size` = (H, W), an aspect-ratio bucket), the pixels the pipeline
    itself would feed its VAE.

    diffusers' `VaeImageProcessor` (FLUX.1, Qwen-Image) scales to cover H × W in crop mode (Lanczos, aspect
    kept, the long side floored), then centre-crops: nothing to add. `Flux2ImageProcessor` (FLUX.2) only
    centre-crops; `scale_first` scales to cover before it (`resize_to_cover`), FLUX.2's documented exception.
    """
    height, width = size if size is not None else (resolution, resolution)
    check_resolution(pipe, height)
    check_resolution(pipe, width)
    images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
    if scale_first:
        images = [resize_to_cover(im, resolution, size=size) for im in images]
    return pipe.image_processor.preprocess(images, height=height, width=width, resize_mode="crop")


def resize_to_cover(image: Any, side: int, *, size: tuple[int, int] | None = None) -> Any:
    """Scale a PIL image (aspect kept, Lanczos) so its short side is `side` (the long side rounded); with `size`
    (H, W), by the one factor that makes it cover H × W (`flowtrain.data.buckets.cover_size`).

    For image processors whose "crop" mode only centre-crops, never scales (diffusers' `Flux2ImageProcessor`): a
    1024 px photo cached at 512 would keep its middle quarter, and a smaller one would be cut short. Scaling first
    makes the crop remove only the long side's excess. `VaeImageProcessor`'s crop mode scales to cover by itself
    (flooring the long side), so a pipeline using it needs no call to this.
    """
    from PIL import Image

    w, h = image.size
    if size is not None:  # a bucket: the same rounding as a square target's, in both axes
        from flowtrain.data.buckets import cover_size

        ch, cw = cover_size((h, w), size)
        return image if (cw, ch) == (w, h) else image.resize((cw, ch), Image.Resampling.LANCZOS)
    scale = side / min(w, h)
    if scale == 1.0:
        return image
    return image.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.LANCZOS)
