"""`dataset.buckets`: aspect-ratio buckets in the config, for `precompute --config` and `train CONFIG --from SRC`.

The same three settings as precompute's `--buckets`, `--bucket-sides` and `--max-aspect` flags (which override
them); `data.buckets.BucketSpec` is what they become once the model's pixel multiple is known.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt, model_validator

from flowtrain.config.section import Section


class BucketsConfig(Section):
    enabled: bool = Field(
        False,
        description="Aspect-ratio buckets when precomputing: each image goes to the bucket nearest its aspect (area "
        "about the precompute resolution², sides multiples of the model's pixel multiple), scaled to cover it and "
        "centre-cropped, never stretched; batches hold one bucket each (docs/prepare.md). false: a square cache.",
    )
    sides: list[PositiveInt] = Field(
        default_factory=list,
        description="More target areas (side² each) besides the resolution's: an image goes to the largest it "
        "reaches without upscaling. Each must be a multiple of the model's pixel multiple.",
    )
    max_aspect: float = Field(
        2.0,
        ge=1.0,
        description="The largest long / short side ratio of a bucket; wider or taller images are cropped to it.",
    )

    @model_validator(mode="after")
    def _only_when_enabled(self) -> BucketsConfig:
        # by value, not by which keys were given: a run's saved config.yaml holds every default
        given = [k for k, v in (("sides", self.sides), ("max_aspect", self.max_aspect != 2.0)) if v]
        if given and not self.enabled:
            raise ValueError(
                f"dataset.buckets.{given[0]} shapes aspect-ratio buckets, which are off: "
                "set dataset.buckets.enabled: true (or remove it)"
            )
        return self
