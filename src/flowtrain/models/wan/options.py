"""Wan's `model:` keys (torch-free: the config layer imports this)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from flowtrain.config.model import ModelOptions


def nearest_frame_counts(n: int, temporal: int = 4) -> tuple[int, int]:
    """The valid frame counts (k·temporal + 1) just below and above `n` (equal when `n` is valid)."""
    below = max(1, (n - 1) // temporal * temporal + 1)
    above = below if below == n else below + temporal
    return below, above


class WanOptions(ModelOptions):
    family: Literal["wan"] = Field(
        "wan",
        description="Wan 2.1 / 2.2 text-to-video (WanPipeline: UMT5-XXL text encoder, AutoencoderKLWan video VAE, "
        "WanTransformer3DModel).",
    )
    max_sequence_length: int = Field(
        512,
        gt=0,
        le=4096,
        description="UMT5 tokens per prompt (WanPipeline.__call__'s default 512, the length the model was trained "
        "with). The cache stores each prompt at its true length; training zero-pads it back to this length, as the "
        "pipeline does. Must match the cache.",
    )
    num_frames: int = Field(
        81,
        gt=0,
        description="Frames per video that validation and `flowtrain sample` generate; a multiple of 4 plus 1 (the "
        "VAE compresses time 4×). 81 is WanPipeline.__call__'s default.",
    )
    fps: int = Field(16, gt=0, description="Frame rate of the .mp4 / preview files validation and sample write.")
    expert: Literal["high_noise", "low_noise"] | None = Field(
        None,
        description="Wan 2.2 A14B (a pipeline with `transformer_2` and `boundary_ratio`): the expert to train. "
        "high_noise = `transformer` (σ ≥ boundary_ratio), low_noise = `transformer_2` (σ < boundary_ratio); training "
        "draws σ only from that expert's range. Must be unset for a one-transformer pipeline (Wan 2.1).",
    )

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        if v % 4 != 1:
            below, above = nearest_frame_counts(v)
            raise ValueError(
                f"model.num_frames={v} is not 4k+1 (the VAE compresses 4 frames into one after the first): use "
                f"{below} or {above}"
            )
        return v
