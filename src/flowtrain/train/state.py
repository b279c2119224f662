"""A checkpoint's `state.json`, typed: where the run is and what it was started with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DataPosition:
    """The next batch to read: epoch, batch within the epoch, and the shuffle seed of the row order."""

    epoch: int
    batch: int
    seed: int


@dataclass
class TrainState:
    step: int
    data: DataPosition
    essentials: dict[str, Any]  # what must not change on resume (train.resume.essentials)
    learning_rate: float
    max_steps: int
    world_size: int
    global_batch: int
    nonfinite: dict[str, int] = field(default_factory=dict)  # NonFiniteGuard counters

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": asdict(self.data),
            "essentials": self.essentials,
            "train": {"learning_rate": self.learning_rate, "max_steps": self.max_steps},
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "nonfinite": self.nonfinite,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        train = d.get("train", {})
        return cls(
            step=d["step"],
            data=DataPosition(**d["data"]),
            essentials=d["essentials"],
            learning_rate=train.get("learning_rate"),
            max_steps=train.get("max_steps"),
            world_size=d.get("world_size", 1),
            global_batch=d.get("global_batch"),
            nonfinite=d.get("nonfinite", {}),
        )
