"""`flowtrain.data.video`'s pure rules: frame selection, fps re-timing, the 4k+1 frame count."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowtrain.config.video import VideoConfig
from flowtrain.data.video import check_frames, frames_needed, nearest_valid_frames, resample_indices, select_clips


def test_head_takes_the_first_frames_of_an_odd_length_video():
    assert select_clips(11, 5, "head") == [[0, 1, 2, 3, 4]]
    assert select_clips(5, 5, "head") == [[0, 1, 2, 3, 4]]


def test_uniform_spreads_over_the_whole_video_first_and_last_included():
    assert select_clips(11, 5, "uniform") == [[0, 2, 5, 8, 10]]  # round(i * 10 / 4): 0, 2.5→2, 5, 7.5→8, 10
    assert select_clips(9, 9, "uniform") == [list(range(9))]
    assert select_clips(7, 1, "uniform") == [[0]]


def test_chunk_cuts_consecutive_clips_and_drops_the_short_remainder():
    assert select_clips(13, 5, "chunk") == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # frames 10..12: too few for a clip
    assert select_clips(15, 5, "chunk") == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]
    assert select_clips(15, 5, "chunk", max_clips=2) == [list(range(0, 5)), list(range(5, 10))]


def test_slide_overlaps_by_the_stride():
    assert select_clips(9, 5, "slide", stride=2) == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8]]
    # default stride: half a clip, (5 - 1) // 2 = 2
    assert select_clips(9, 5, "slide") == select_clips(9, 5, "slide", stride=2)
    assert select_clips(10, 5, "slide", stride=3) == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]]
    assert len(select_clips(101, 5, "slide", stride=1, max_clips=4)) == 4


@pytest.mark.parametrize("selection", ["head", "uniform", "chunk", "slide"])
def test_a_video_shorter_than_one_clip_gives_no_clip(selection):
    assert select_clips(4, 5, selection) == []
    assert select_clips(0, 1, selection) == []


def test_fps_resampling_picks_the_frame_on_screen_at_each_output_time():
    assert resample_indices(7, 30.0, 30.0) == list(range(7))
    assert resample_indices(7, 30.0, None) == list(range(7))
    assert resample_indices(10, 30.0, 10.0) == [0, 3, 6, 9]  # exact 3:1 ratio, no frame lost to float rounding
    assert resample_indices(11, 25.0, 10.0) == [0, 2, 5, 7, 10]  # 2.5 source frames per output frame, floored
    assert resample_indices(3, 8.0, 16.0) == [0, 0, 1, 1, 2]  # a higher target repeats frames, same speed
    assert resample_indices(7, None, 16.0) == list(range(7))  # unknown source fps: left as it is


def test_selection_happens_on_the_retimed_video():
    # 24 fps → 8 fps: every third frame; a 5-frame clip then spans 13 source frames
    assert select_clips(15, 5, "head", fps=24.0, target_fps=8.0) == [[0, 3, 6, 9, 12]]
    assert select_clips(12, 5, "head", fps=24.0, target_fps=8.0) == []
    assert frames_needed(5, 24.0, 8.0) == 13
    assert frames_needed(5, None, 8.0) == 5
    assert select_clips(frames_needed(9, 25.0, 10.0), 9, "head", fps=25.0, target_fps=10.0) != []
    assert select_clips(frames_needed(9, 25.0, 10.0) - 1, 9, "head", fps=25.0, target_fps=10.0) == []


def test_frame_counts_must_be_4k_plus_1_and_the_refusal_names_the_nearest():
    for ok in (1, 5, 9, 81):
        assert check_frames(ok) == ok
    assert nearest_valid_frames(8) == [9]
    assert nearest_valid_frames(6) == [5]
    assert nearest_valid_frames(7) == [5, 9]
    assert nearest_valid_frames(80) == [81]
    with pytest.raises(ValueError, match=r"frames=80 is not of the form 4k\+1 .* the nearest valid value is 81"):
        check_frames(80)
    with pytest.raises(ValueError, match="nearest valid value is 5 or 9"):
        check_frames(7)


def test_the_config_refuses_a_wrong_frame_count_with_the_nearest_valid_one():
    assert VideoConfig(frames=17).frames == 17
    with pytest.raises(ValidationError, match=r"dataset.video.frames=16 is not of the form 4k\+1.*17"):
        VideoConfig(frames=16)
    with pytest.raises(ValidationError):
        VideoConfig(selection="random")


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="expected one of head, uniform, chunk, slide"):
        select_clips(9, 5, "middle")  # type: ignore[arg-type]
