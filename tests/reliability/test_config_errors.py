"""Config errors from the CLI: one clear message on stderr, no traceback, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowtrain.cli import main
from flowtrain.testing import killharness as kh

GOOD = "model:\n  family: flux2_klein\n  pretrained: some/model\ntrain:\n  max_steps: 10\n"


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (GOOD.replace("max_steps", "max_stpes"), [], ["train.max_stpes", "unknown key", "`train.max_steps`?"]),
        (GOOD.replace("10", "ten"), [], ["train.max_steps", "expected `int`", "'ten'"]),
        ("train:\n  max_steps: 10\n", [], ["model", "required section is missing", "model.pretrained"]),
        (GOOD + "lora:\n  rank: [4\n", [], ["invalid YAML", "line"]),
        (GOOD, ["train.learning_rate=-1"], ["train.learning_rate", "command line override", "greater than 0"]),
        (GOOD, ["checkpoint.every_minutes=soon"], ["checkpoint.every_minutes", "'soon'"]),
        (GOOD, ["train.nonfinite=ignore"], ["train.nonfinite", "'skip' or 'stop'"]),
        (GOOD, ["trainmax_steps"], ["malformed override `trainmax_steps`"]),
        (GOOD, ["--max-train-stepz", "3"], ["unrecognized arguments: --max-train-stepz"]),
        (GOOD, ["train.=3"], ["malformed override"]),
    ],
)
@pytest.mark.parametrize("verb", ["train", "check"])
def test_config_error_is_one_message_without_traceback(tmp_path, capsys, verb, text, overrides, expected):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    rc = _main([verb, str(cfg), *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    for part in expected:
        assert part in err, (part, err)
    assert "Traceback" not in err


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors: usage + one line, exit code 2
        return e.code


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and "nope.yaml" in err and "Traceback" not in err


def test_config_error_through_the_console_script(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(GOOD.replace("max_steps", "max_step"))
    exe = Path(sys.executable).parent / "flowtrain"
    proc = subprocess.run([str(exe), "train", str(cfg)], capture_output=True, text=True, env=kh.child_env(),
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "train.max_step" in proc.stderr and "Traceback" not in proc.stderr
    first = [line for line in proc.stderr.splitlines() if "error" in line.lower()][0]
    assert first.startswith("flowtrain train: error")
