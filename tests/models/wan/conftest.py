"""Tiny Wan pipeline folders for this folder's tests (one transformer; and two experts, Wan 2.2 A14B-like), built
offline once; short video clips as pixel tensors (B, 3, F, H, W) in [-1, 1], built directly (decoding video files
is the data layer's job); batches collated by the generic cache reader's `Collate`."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Prompts of different lengths, one with words the tiny vocabulary lacks (spelled out in characters).
PROMPTS = [
    "a handwritten digit seven moving left",
    "a red square, a blue circle, a green triangle moving across a small black canvas",
    "zebra",
]
RES, FRAMES = 32, 9  # 9 frames → 3 latent frames; 32 px → 4×4 latents


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    from flowtrain.models.wan.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "pipeline")


@pytest.fixture(scope="session")
def experts_dir(tmp_path_factory):
    from flowtrain.models.wan.tiny import TinySpec, save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("wan22") / "pipeline", TinySpec(boundary_ratio=0.875))


@pytest.fixture(scope="session")
def fam():
    from flowtrain.models import get_family

    return get_family("wan")


@pytest.fixture(scope="session")
def options(wan_dir):
    """The validated `model:` section for the tiny pipeline: fp32, the family's tiny_options, 9 frames."""
    from flowtrain.testing.data import tiny_model

    return tiny_model(wan_dir, "wan", num_frames=FRAMES)


@pytest.fixture(scope="session")
def pipe(wan_dir):
    """The reference: diffusers' pipeline, loaded on its own (never modified by a test)."""
    from diffusers import WanPipeline

    p = WanPipeline.from_pretrained(wan_dir, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def encoders(fam, options):
    return fam.load_encoders(options, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def videos():
    """Three clips (3, 3, 9, 32, 32) in [-1, 1]: a bright square moving over noise, so frames differ."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 3, FRAMES, RES, RES, generator=g) * 0.4 - 0.2
    for f in range(FRAMES):
        v[:, :, f, 8:20, 2 + 2 * f : 14 + 2 * f] = 0.9
    return v


@pytest.fixture(scope="session")
def cached(fam, encoders, options, videos):
    """What precompute stores per row: {"prompt_embeds": [(L_i, D)], "latent_moments": (B, 32, 3, 4, 4)}, and the
    empty prompt's row."""
    text = fam.encode_prompts(encoders, PROMPTS, options)
    moments = fam.encode_pixels(encoders, videos)
    empty = fam.encode_prompts(encoders, [""], options)
    return {**text, **moments, "empty": empty["prompt_embeds"][0]}


@pytest.fixture(scope="session")
def prompts():
    return PROMPTS


@pytest.fixture(scope="session")
def make_batch():
    return _make_batch


@pytest.fixture(scope="session")
def norm(fam, encoders):
    return {k: torch.tensor(v) for k, v in fam.latent_norm(encoders).items()}


@pytest.fixture(scope="session")
def step(fam, options):
    """flowtrain's step → (per-sample loss (B,), velocity prediction (B, N, 16))."""
    return lambda *a: _step(fam, options, *a)


def _make_batch(cached: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    """Rows of the cache collated as the cache reader collates them: fixed columns stacked, the variable-length text
    column padded to the batch's longest row with a bool `prompt_embeds_mask`."""
    from flowtrain.data.cache import Collate

    return Collate(variable=("prompt_embeds",))(
        [{"latent_moments": cached["latent_moments"][i], "prompt_embeds": cached["prompt_embeds"][i]} for i in rows]
    )


def _step(fam, options, transformer, batch, norm, sigma, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """flowtrain's training step: latents → interpolate → predict → per-sample MSE against the velocity target."""
    from flowtrain.flow import interpolate, velocity_target

    x0, shape = fam.training_latents(batch, norm, None)
    cond = fam.conditioning(batch, options)
    pred = fam.predict(transformer, interpolate(x0, noise, sigma), sigma, cond, shape)
    return ((pred.float() - velocity_target(x0, noise).float()) ** 2).mean(dim=(1, 2)), pred


# Captions of the video cache: eight clips, a coloured square moving in one of four directions.
CLIP_CAPTIONS = [
    f"a {colour} square moving {direction}"
    for colour in ("red", "blue")
    for direction in ("left", "right", "up", "down")
]


def moving_squares(n: int, frames: int = FRAMES, side: int = RES, seed: int = 0) -> torch.Tensor:
    """(n, 3, frames, side, side) clips in [-1, 1]: clip i is a square of colour i // 4 moving in direction i % 4
    (left, right, up, down) over faint noise."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.rand(n, 3, frames, side, side, generator=g) * 0.2 - 0.9
    moves = [(0, -2), (0, 2), (-2, 0), (2, 0)]
    for i in range(n):
        dy, dx = moves[i % 4]
        for f in range(frames):
            y, x = side // 2 - 5 + dy * (f - frames // 2), side // 2 - 5 + dx * (f - frames // 2)
            clips[i, (i // 4) % 3, f, max(0, y) : max(0, y + 10), max(0, x) : max(0, x + 10)] = 0.9
    return clips


def write_video_cache(out, pipeline, captions: list[str], frames: int = FRAMES, **options):
    """A latent cache of video clips in exactly the layout `flowtrain precompute` writes (its own writer, column
    types, empty-prompt file and manifest), the clips encoded through the family's `encode_pixels` (B, 3, F, H, W)
    path. Decoding video files into such tensors is the data layer's part; this builds the tensors directly.
    `options`: more `model:` keys (e.g. `expert` for a two-expert pipeline)."""
    import pyarrow as pa

    from flowtrain.data.manifest import CacheManifest
    from flowtrain.data.precompute import _save_empty_prompt, cache_fingerprint, column_array, write_shard
    from flowtrain.models import get_family
    from flowtrain.testing.data import tiny_model

    if (out / "manifest.json").exists():
        return out
    fam, model = get_family("wan"), tiny_model(pipeline, "wan", num_frames=frames, **options)
    encoders = fam.load_encoders(model, dtype=torch.float32, device="cpu")
    columns = fam.cache_columns(encoders, model, resolution=RES, frames=frames)
    out.mkdir(parents=True, exist_ok=True)
    _save_empty_prompt(out, fam, encoders, model, columns)
    encoded = {**fam.encode_pixels(encoders, moving_squares(len(captions), frames)),
               **fam.encode_prompts(encoders, captions, model)}  # fmt: skip
    table = pa.table(
        {
            "key": pa.array([f"clip{i:02d}" for i in range(len(captions))], pa.string()),
            "caption": pa.array(captions, pa.string()),
            **{c.name: column_array(c, encoded[c.name]) for c in columns},
        }
    )
    write_shard(table, out / "cache-00000-0000.parquet")
    shards = [{"file": "cache-00000-0000.parquet", "rows": len(captions)}]
    fp = cache_fingerprint(model, RES)
    CacheManifest(fam.name, fp, columns, fam.latent_norm(encoders), shards, source="moving squares").write(out)
    return out


@pytest.fixture(scope="session")
def video_cache(wan_dir, tmp_path_factory):
    return write_video_cache(tmp_path_factory.mktemp("video-cache") / "cache", wan_dir, CLIP_CAPTIONS)


@pytest.fixture(scope="session")
def video_cache_writer():
    """`write(out, pipeline, **model_options)`: `write_video_cache` of the moving-squares clips (test modules cannot
    import this conftest)."""
    return lambda out, pipeline, **options: write_video_cache(out, pipeline, CLIP_CAPTIONS, **options)
