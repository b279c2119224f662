"""The CLI picks passive OpenMP waiting before torch loads, unless the user chose (issue 11, case 9).

With GNU OpenMP's default spinning, the tiny model trained ~20× slower on a busy 2-core machine (0.48 vs 0.024
s/step); the Makefile exported OMP_WAIT_POLICY=PASSIVE, but `flowtrain train` run directly did not get it. What
OpenMP actually uses is read back from libgomp itself (OMP_DISPLAY_ENV), in a fresh process where `flowtrain.cli.main`
runs before torch is imported, as in the console script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

CODE = """
import os, sys
from flowtrain.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
assert "torch" not in sys.modules
print("env:", os.environ.get("OMP_WAIT_POLICY"), file=sys.stderr)
import torch
torch.ones(4) + 1
"""


def _openmp_settings(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    proc = subprocess.run(
        [sys.executable, "-c", CODE],
        env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    settings = dict(re.findall(r"^\s*(OMP_WAIT_POLICY|GOMP_SPINCOUNT) = '([^']*)'", proc.stderr, re.M))
    settings["env"] = re.search(r"^env: (\S+)", proc.stderr, re.M).group(1)
    if "GOMP_SPINCOUNT" not in settings:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp: nothing to display")
    return settings


def test_cli_sets_passive_waiting_before_torch_loads():
    got = _openmp_settings()
    assert got["env"] == "PASSIVE" and got["GOMP_SPINCOUNT"] == "0"  # libgomp's own default spins 300000 times


def test_the_users_own_choice_wins():
    assert _openmp_settings(OMP_WAIT_POLICY="ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"
    got = _openmp_settings(GOMP_SPINCOUNT="1000")
    assert got["env"] == "None" and got["GOMP_SPINCOUNT"] == "1000"
