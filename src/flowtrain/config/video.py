"""`dataset.video`: how precompute cuts clips out of videos (docs/video.md). Data only; the rules are in
`flowtrain.data.video`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from flowtrain.config.section import Section


class VideoConfig(Section):
    frames: int = Field(
        81,
        ge=1,
        description="Frames per clip; must be 4k+1 (1, 5, 9, ..., 81: the video VAE keeps the first frame and "
        "compresses each further 4 into one latent frame). Used when the raw shards hold videos; an image row is a "
        "one-frame video (see `images`).",
    )
    images: bool = Field(
        True,
        description="Cache the image rows of a folder that also holds videos, each as a one-frame clip: with frames "
        "> 1 they go into cache shards of their own (one frame count per shard) and every training batch holds one "
        "frame count. false: leave images out and train on the videos' clips only.",
    )
    selection: Literal["head", "uniform", "chunk", "slide"] = Field(
        "head",
        description="Which frames make a clip: `head` the first ones; `uniform` spread evenly over the whole video; "
        "`chunk` consecutive non-overlapping clips (several per video); `slide` overlapping clips every `stride` "
        "frames. Videos shorter than one clip are left out (precompute logs how many).",
    )
    target_fps: float | None = Field(
        None, gt=0, description="Re-time videos to this frame rate before selecting (null: keep each video's own)."
    )
    stride: int | None = Field(
        None, ge=1, description="`slide`: frames between clip starts (null: half a clip, (frames - 1) // 2)."
    )
    max_clips: int | None = Field(None, ge=1, description="`chunk` / `slide`: at most this many clips per video.")

    @field_validator("frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        from flowtrain.data.video import check_frames

        return check_frames(v, "dataset.video.frames")
