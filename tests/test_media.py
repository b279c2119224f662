"""`flowtrain.media`: a sample that is a video (a list of frames) becomes .mp4 + .gif preview + frame-strip .png; an
image stays one .png."""

from __future__ import annotations

import numpy as np
from PIL import Image

from flowtrain.media import PREVIEW_SIDE, save_sample, still


def _frames(n: int, side: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((side, side, 3), 20 * i, dtype=np.uint8)) for i in range(n)]


def test_a_video_is_written_as_mp4_gif_and_strip(tmp_path):
    import av

    frames = _frames(9, 32)
    paths = save_sample(frames, tmp_path / "v.png", fps=8)
    assert [p.name for p in paths] == ["v.png", "v.mp4", "v.gif"]
    strip = Image.open(paths[0])
    assert strip.size == (9 * 32, 32) and still(frames).size == strip.size
    assert np.asarray(strip)[0, 8 * 32 + 1, 0] == 160  # frame 8 sits last, in order
    with av.open(str(paths[1])) as video:
        stream = video.streams.video[0]
        assert sum(1 for _ in video.decode(video=0)) == 9 and stream.average_rate == 8
    gif = Image.open(paths[2])
    assert gif.n_frames == 9 and gif.info["loop"] == 0 and abs(gif.info["duration"] - 125) <= 10  # GIF: 1/100 s


def test_a_large_video_gets_a_small_preview(tmp_path):
    paths = save_sample(_frames(5, 512), tmp_path / "big.png")
    assert max(Image.open(paths[2]).size) == PREVIEW_SIDE


def test_an_image_is_one_png(tmp_path):
    image = _frames(1, 16)[0]
    assert save_sample(image, tmp_path / "i.png") == [tmp_path / "i.png"] and still(image) is image
