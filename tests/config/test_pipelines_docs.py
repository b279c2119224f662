"""docs/pipelines.md documents every key of a stage with its default."""

from __future__ import annotations

from pathlib import Path

from flowtrain.config.reference import option_rows
from flowtrain.config.stages import StageConfig

DOC = Path(__file__).parents[2] / "docs" / "pipelines.md"


def test_every_stage_option_is_documented_with_its_default():
    text = DOC.read_text()
    rows = option_rows(StageConfig)
    assert len(rows) >= 12
    for key, _, default, _ in rows:
        line = next((x for x in text.splitlines() if x.startswith(f"| `stages[].{key}` |")), None)
        assert line is not None, f"docs/pipelines.md does not document stages[].{key}"
        assert f"| `{default}` |" in line, f"docs/pipelines.md shows another default for stages[].{key}: {line}"
