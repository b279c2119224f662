"""Video files end to end through the generic plumbing with a real video family: `flowtrain prepare` on .mp4 files,
`flowtrain precompute` cutting clips and handing (B, 3, F, H, W) to the family's VAE, the cache holding rank-4 rows
and the loader batching (B, 2C, F', H', W'). Runs wherever a video family is registered (`wan`)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flowtrain.data.video import decode_frames, write_video
from flowtrain.models import family_names

pytestmark = pytest.mark.skipif("wan" not in family_names(), reason="no video family registered")


def moving_square(n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    frames = (rng.random((n, size, size, 3)) * 60).astype(np.uint8)
    for f in range(n):
        frames[f, 8:20, 2 + f : 14 + f] = 230
    return frames


@pytest.mark.slow  # ~50 s on 2 shared cores: a tiny Wan pipeline is written and loaded twice (CLI + reference)
def test_video_files_become_5d_latents_the_family_would_compute(tmp_path):
    from flowtrain.cli import main
    from flowtrain.data.cache import CacheDataset, Collate
    from flowtrain.models import get_family
    from flowtrain.testing.data import tiny_model

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_video(src / f"v{i}.mp4", moving_square(13, rng), fps=8)
        (src / f"v{i}.txt").write_text(f"a square moving right {i}")
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(src / "still.png")
    (src / "still.txt").write_text("a still image")
    assert main(["prepare", str(src), "--out", str(tmp_path / "raw"), "--quiet"]) == 0

    family = get_family("wan")
    wan = family.save_tiny_pipeline(tmp_path / "wan")
    cache = tmp_path / "cache"
    args = ["precompute", str(tmp_path / "raw"), "--out", str(cache), "--model", str(wan), "--resolution", "32",
            "--dtype", "float32", "--quiet", "model.max_sequence_length=32", "dataset.video.frames=9",
            "dataset.video.selection=slide", "dataset.video.stride=4"]  # fmt: skip
    assert main(args) == 0
    ds = CacheDataset(cache)
    keys = [k for s in ds.manifest.shards for k in pq.read_table(cache / s["file"]).column("key").to_pylist()]
    # 13 frames: clips at 0 and 4; the image: a one-frame clip in a shard of its own
    assert keys == ["v0#0", "v0#1", "v1#0", "v1#1", "v2#0", "v2#1", "still"]
    latent = ds.manifest.column("latent_moments")
    assert latent.shape == (32, 3, 4, 4)  # 2·16 channels, (9 - 1)/4 + 1 latent frames, 32/8 px
    assert ds[keys.index("still")]["latent_moments"].shape == (32, 1, 4, 4)

    model = tiny_model(wan, "wan", max_sequence_length=32)
    encoders = family.load_encoders(model, dtype=torch.float32, device="cpu")
    raw = {r["key"]: r for r in pq.read_table(tmp_path / "raw" / "raw-00000.parquet").to_pylist()}
    frames = decode_frames(raw["v2"]["image"], list(range(4, 13)))
    pixels = family.preprocess_images(encoders, frames, resolution=32).permute(1, 0, 2, 3)[None]  # (1, 3, 9, H, W)
    want = family.encode_pixels(encoders, pixels)["latent_moments"][0]
    torch.testing.assert_close(ds[keys.index("v2#1")]["latent_moments"], want, rtol=0, atol=1e-5)

    batch = Collate(variable=("prompt_embeds",))([ds[0], ds[1]])
    assert batch["latent_moments"].shape == (2, 32, 3, 4, 4)
