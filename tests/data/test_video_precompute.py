"""Precompute's video path (data/clips.py) with the real tiny Klein pipeline: raw video rows are cut into clips as
`dataset.video` says and each clip's pixels go through the family's own preprocessing and VAE; the clip plan and
rank-4 latent rows are checked on their own."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flowtrain.config.video import VideoConfig
from flowtrain.data.clips import FRAMES, RAW_ROW, plan
from flowtrain.data.tensors import column_to_tensor, tensor_column
from flowtrain.data.video import decode_frames, write_video


def grey_frames(n: int, size: tuple[int, int] = (40, 48), start: int = 0) -> np.ndarray:
    levels = 10 + 20 * (start + np.arange(n))
    return np.broadcast_to(levels[:, None, None, None], (n, *size, 3)).astype(np.uint8).copy()


def _meta(rows: list[tuple[str, str | None, int, float | None]]) -> pa.Table:
    keys, formats, counts, rates = zip(*rows, strict=True)
    return pa.table({"key": list(keys), "caption": [f"c {k}" for k in keys], "image": [k.encode() for k in keys],
                     "format": list(formats), "num_frames": list(counts), "fps": list(rates)})  # fmt: skip


def test_plan_names_one_row_per_clip_and_counts_what_gave_none():
    part = _meta([("a", "MP4", 13, 8.0), ("b", "WEBM", 4, 8.0), ("img", "PNG", 1, None), ("c", "MOV", 5, 8.0)])
    table, left_out = plan(part, VideoConfig(frames=5, selection="chunk", images=False))
    assert table.column("key").to_pylist() == ["a#0", "a#1", "c#0"]
    assert table.column(FRAMES).to_pylist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    assert table.column(RAW_ROW).to_pylist() == [0, 0, 3]
    assert left_out == 2  # "b" is too short; images are left out (dataset.video.images: false)
    # the video's bytes are referenced per clip, not copied: a dictionary over the raw slice's values
    assert pa.types.is_dictionary(table.schema.field("image").type)
    assert table.column("image").to_pylist() == [b"a", b"a", b"c"]

    table, left_out = plan(part, VideoConfig(frames=5, selection="chunk"))  # images kept: one-frame clips
    assert table.column("key").to_pylist() == ["a#0", "a#1", "img", "c#0"] and left_out == 1
    assert table.column(FRAMES).to_pylist()[2] == [0]
    table, left_out = plan(part, VideoConfig(frames=1, selection="head"))
    assert table.column("key").to_pylist() == ["a", "b", "img", "c"] and left_out == 0  # an image: a one-frame video
    table, _ = plan(part, VideoConfig(frames=5, selection="uniform", target_fps=4.0, images=False))
    # a at 4 fps is frames 0 2 4 … 12 (7); 5 spread evenly over them: positions 0 1.5 3 4.5 6, half to even
    assert table.column(FRAMES).to_pylist() == [[0, 4, 6, 8, 12]]


def test_rank4_latent_rows_round_trip_through_the_cache_columns():
    moments = torch.randn(3, 32, 2, 4, 4)  # (B, 2C, F', H', W'): a video VAE's per-row moments
    col = tensor_column(moments, "float32")
    assert col.type.shape == [32, 2, 4, 4]
    assert torch.equal(column_to_tensor(col, "float32"), moments)
    assert torch.equal(column_to_tensor(tensor_column(moments, "bfloat16"), "bfloat16"), moments.bfloat16())


@pytest.fixture(scope="module")
def raw_videos(tmp_path_factory):
    from flowtrain.data.prepare import prepare

    src = tmp_path_factory.mktemp("vsrc")
    write_video(src / "walk.mp4", grey_frames(11), fps=8)
    (src / "walk.txt").write_text("a grey walk")
    write_video(src / "wave.webm", grey_frames(9, start=2), fps=12)
    (src / "wave.txt").write_text("a grey wave")
    Image.fromarray(grey_frames(1, start=5)[0]).save(src / "still.png")
    (src / "still.txt").write_text("a still")
    raw = src.parent / "vraw"
    report = prepare(src, raw, progress=False)
    assert (report.written, report.videos) == (3, 2)
    return raw


def test_precompute_cli_caches_clips_as_the_family_encodes_frames(tmp_path, raw_videos, tiny_pipeline_dir):
    from flowtrain.cli import main
    from flowtrain.data.cache import CacheDataset
    from flowtrain.data.precompute import cache_fingerprint
    from flowtrain.models import get_family
    from flowtrain.testing.data import tiny_model

    out = tmp_path / "cache"
    args = ["precompute", str(raw_videos), "--out", str(out), "--model", str(tiny_pipeline_dir), "--resolution",
            "32", "--dtype", "float32", "--quiet", "model.max_sequence_length=32", "dataset.video.frames=1",
            "dataset.video.selection=chunk", "dataset.video.max_clips=3", "dataset.video.target_fps=4"]  # fmt: skip
    assert main(args) == 0
    ds = CacheDataset(out)
    keys = [k for s in ds.manifest.shards for k in pq.read_table(out / s["file"]).column("key").to_pylist()]
    # walk: 11 frames at 8 fps → 4 fps keeps 0 2 4 6 8 10, 3 clips of 1; wave 12 → 4 fps: 0 3 6; still: itself
    assert sorted(keys) == ["still", "walk#0", "walk#1", "walk#2", "wave#0", "wave#1", "wave#2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"]["settings"]["video"]["selection"] == "chunk"

    # each row is what the family makes of that one frame: its own preprocessing and VAE, nothing else
    family = get_family("flux2_klein")
    model = tiny_model(tiny_pipeline_dir, max_sequence_length=32)
    assert manifest["fingerprint"]["id"] != cache_fingerprint(model, 32)["id"]  # the image path's differs
    encoders = family.load_encoders(model, dtype=torch.float32, device="cpu")
    raw = {r["key"]: r for r in pq.read_table(raw_videos / "raw-00000.parquet").to_pylist()}
    expect = {"walk#1": ("walk", 2), "wave#2": ("wave", 6)}
    by_key = {k: i for i, k in enumerate(keys)}
    for key, (src, frame) in expect.items():
        images = decode_frames(raw[src]["image"], [frame, frame + 1])
        pixels = family.preprocess_images(encoders, images, resolution=32)
        want, neighbour = family.encode_pixels(encoders, pixels)["latent_moments"]
        got = ds[by_key[key]]["latent_moments"]
        # fp32, another batch composition: equal to float noise; the next frame (one grey level up) is far off
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert (got - neighbour).abs().max() > 1e-2
    image = Image.open(io.BytesIO(raw["still"]["image"]))
    still = family.encode_pixels(encoders, family.preprocess_images(encoders, [image], resolution=32))
    still = still["latent_moments"][0]
    torch.testing.assert_close(ds[by_key["still"]]["latent_moments"], still, rtol=0, atol=1e-4)


def test_an_image_family_refuses_multi_frame_clips_with_the_fix(tmp_path, raw_videos, tiny_pipeline_dir):
    from flowtrain.data.precompute import precompute
    from flowtrain.testing.data import tiny_model

    model = tiny_model(tiny_pipeline_dir, max_sequence_length=32)
    with pytest.raises(ValueError, match=r"2 video\(s\) and family 'flux2_klein' encodes images: set "
                       r"dataset.video.frames: 1"):  # fmt: skip
        precompute(raw_videos, tmp_path / "c", model, resolution=32, progress=False, video=VideoConfig(frames=5))
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_clip_pixels_hands_a_video_family_b_3_f_h_w_in_frame_order(raw_videos, tiny_pipeline_dir):
    """The layout contract of models/base.py: a video family (its `cache_columns` takes `frames`) receives
    (B, 3, F, H, W), frame f of clip b being the family's own preprocessing of that source frame. Klein's real
    preprocessing, declared a video family only to read the layout off (its VAE is not asked to encode it)."""
    from flowtrain.data.clips import clip_pixels, is_video_family
    from flowtrain.models import get_family
    from flowtrain.testing.data import tiny_model

    klein = get_family("flux2_klein")

    class KleinFramesAsVideo(type(klein)):
        def cache_columns(self, encoders, model, *, resolution, frames=1):
            return super().cache_columns(encoders, model, resolution=resolution)

    as_video = KleinFramesAsVideo()
    assert is_video_family(as_video) and not is_video_family(klein)
    encoders = klein.load_encoders(tiny_model(tiny_pipeline_dir, max_sequence_length=32), dtype=torch.float32,
                                   device="cpu")  # fmt: skip
    part = pq.read_table(raw_videos / "raw-00000.parquet")
    table, left_out = plan(part, VideoConfig(frames=5, selection="slide", stride=2, images=False))
    assert left_out == 1  # the image
    walk, wave = [f"walk#{i}" for i in range(4)], [f"wave#{i}" for i in range(3)]  # starts 0 2 4 6 of 11; 0 2 4 of 9
    assert table.column("key").to_pylist() == walk + wave
    rows = table.to_pydict()
    assert rows[FRAMES][1] == [2, 3, 4, 5, 6] and rows[FRAMES][6] == [4, 5, 6, 7, 8]
    pixels = clip_pixels(as_video, encoders, rows, 32)
    assert pixels.shape == (7, 3, 5, 32, 32)
    raw = {r["key"]: r for r in part.to_pylist()}
    for b in (1, 6):  # walk frames 2..6, wave frames 4..8
        src = rows["key"][b].split("#")[0]
        frames = decode_frames(raw[src]["image"], rows[FRAMES][b])
        want = klein.preprocess_images(encoders, frames, resolution=32)  # (F, 3, H, W)
        assert torch.equal(pixels[b], want.permute(1, 0, 2, 3))
    flat = clip_pixels(klein, encoders, plan(part, VideoConfig(frames=1))[0].to_pydict(), 32)
    assert flat.shape == (3, 3, 32, 32)  # an image family: one frame per clip, its usual (B, 3, H, W)


def test_an_interrupted_clip_precompute_continues_where_it_stopped(tmp_path, raw_videos, tiny_pipeline_dir):
    """Cache shards of the video path are named and checked by their planned clip keys, so a rerun keeps the
    finished ones and recomputes only what is missing."""
    from flowtrain.data.precompute import precompute
    from flowtrain.testing.data import tiny_model

    model = tiny_model(tiny_pipeline_dir, max_sequence_length=32)
    video = VideoConfig(frames=1, selection="chunk", max_clips=2)
    out = tmp_path / "cache"
    first = precompute(raw_videos, out, model, resolution=32, rows_per_shard=1, progress=False, video=video)
    assert [s["rows"] for s in first.shards] == [1, 2, 2]  # still, walk#0 walk#1, wave#0 wave#1 (raw key order)
    kept = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in first.shards}
    lost = first.shards[2]["file"]
    before = pq.read_table(out / lost)
    (out / lost).unlink()
    (out / "manifest.json").unlink()  # as if killed before the end
    again = precompute(raw_videos, out, model, resolution=32, rows_per_shard=1, progress=False, video=video)
    assert again.shards == first.shards and again.fingerprint == first.fingerprint
    for name, mtime in kept.items():
        assert ((out / name).stat().st_mtime_ns == mtime) == (name != lost), name
    assert pq.read_table(out / lost).equals(before)
