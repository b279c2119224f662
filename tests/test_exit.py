"""`flowtrain.exit.exit_now`: the console entry ends without the interpreter's teardown, but only after what that
teardown does for files and children: non-daemon threads joined, `atexit` callbacks run, stdio flushed, and the
command's exit code kept. Each case runs in a fresh process, as the `flowtrain` command does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from flowtrain.exit import FULL_EXIT_ENV

CHILD = """
import atexit, sys, threading, time, weakref
from pathlib import Path
from flowtrain.exit import exit_now

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

class Resource:
    pass

r = Resource()
weakref.finalize(r, lambda: (out / "finalize").write_text("ran"))  # atexit=True by default: run at exit

def late_writer():
    time.sleep(0.3)
    (out / "thread").write_text("ran")

threading.Thread(target=late_writer).start()  # non-daemon: the process must wait for it
sys.stdout.write("buffered, no newline")  # still in the buffer when exit_now is called
exit_now(int(sys.argv[2]))
"""


@pytest.mark.parametrize("full_exit", [False, True])
def test_exit_now_keeps_what_teardown_does_for_files(tmp_path, full_exit):
    env = {k: v for k, v in os.environ.items() if k != FULL_EXIT_ENV}
    if full_exit:
        env[FULL_EXIT_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), "3"], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    for name in ("atexit", "finalize", "thread"):
        assert (tmp_path / name).read_text() == "ran", name


TEARDOWN = """
import os, sys
from flowtrain.exit import exit_now

class WrittenAtTeardown:  # a module global: only the interpreter's teardown deletes it
    def __init__(self):
        self.write = os.write  # held here: by then modules and builtins are being torn down

    def __del__(self):
        self.write(2, b"teardown ran\\n")

kept = WrittenAtTeardown()
exit_now(0)
"""


@pytest.mark.parametrize("full_exit", [False, True])
def test_exit_now_skips_the_interpreter_teardown_unless_asked(tmp_path, full_exit):
    """What makes it fast: objects only the teardown would free are not freed one by one."""
    env = {k: v for k, v in os.environ.items() if k != FULL_EXIT_ENV}
    if full_exit:
        env[FULL_EXIT_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", TEARDOWN], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0
    assert (b"teardown ran" in proc.stderr) == full_exit, proc.stderr


def test_exit_now_of_none_is_success(tmp_path):
    code = "from flowtrain.exit import exit_now; exit_now(None)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_console_entry_keeps_exit_codes_and_output(tmp_path):
    """`python -m flowtrain` through `cli.run`: a user error's exit code and message, a success's summary line."""
    bad = subprocess.run([sys.executable, "-m", "flowtrain", "check", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "missing.yaml" in bad.stderr
    from flowtrain.testing.data import tiny_config_dict

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "p", tmp_path / "c", tmp_path / "r")))
    ok = subprocess.run([sys.executable, "-m", "flowtrain", "check", "cfg.yaml"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["output_dir"] == str(tmp_path / "r")  # the whole resolved config came out
