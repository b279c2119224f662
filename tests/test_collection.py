"""Every test file under tests/ is collected by the configured pytest: a folder skipped by a pytest default (as
`dist` once was, by `norecursedirs`) or by a typo in pyproject fails here instead of silently running nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def collected_files(out: str) -> set[str]:
    """The test files named by `pytest --collect-only -q` node ids ("tests/a/test_b.py::test_c[x]")."""
    return {line.split("::", 1)[0] for line in out.splitlines() if "::" in line}


def test_every_test_file_is_collected():
    # The project's own pytest config (pyproject's testpaths, norecursedirs, addopts), run as `make test` runs it,
    # except `-m ""`: the later -m replaces addopts' `-m 'not slow'`, so a file holding only slow tests counts as
    # collected (deselection is not what this test is about).
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"collection failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    found = collected_files(proc.stdout)
    on_disk = {
        p.relative_to(ROOT).as_posix()
        for pattern in ("test_*.py", "*_test.py")
        for p in (ROOT / "tests").rglob(pattern)
        if "__pycache__" not in p.parts
    }
    missing = sorted(on_disk - found)
    assert not missing, (
        f"test files pytest does not collect (check norecursedirs / python_files in pyproject.toml): {missing}"
    )
    assert "tests/dist/test_ddp_cpu.py" in found  # the folder a pytest default used to skip


def test_collected_files_parses_node_ids():
    out = "tests/a/test_b.py::test_c[x-1]\ntests/d/test_e.py::TestF::test_g\n\n3 tests collected in 0.1s\n"
    assert collected_files(out) == {"tests/a/test_b.py", "tests/d/test_e.py"}
