"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Config classes hold data only; unknown keys are errors (a typo names its key), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
