"""`flowtrain.gc_pause`: the collector is off while models load and back on after, as it was; a flowtrain command's
own process also freezes what loading left, a caller's process (tests, notebooks) never."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from flowtrain import gc_pause


@pytest.fixture
def fresh_gc(monkeypatch):
    """The collector on, nothing frozen by this test left frozen after it."""
    monkeypatch.setattr(gc_pause, "_depth", 0)
    was = gc.isenabled()
    gc.enable()
    frozen = gc.get_freeze_count()
    yield frozen
    if gc.get_freeze_count() != frozen:
        gc.unfreeze()
    (gc.enable if was else gc.disable)()


def test_collector_off_inside_nested_blocks_and_back_on_after(fresh_gc):
    with gc_pause.loading():
        assert not gc.isenabled()
        with gc_pause.loading():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block's exit is not the end of loading
    assert gc.isenabled()
    assert gc.get_freeze_count() == fresh_gc  # not flowtrain's own process: nothing frozen


def test_collector_back_on_after_an_error(fresh_gc):
    with pytest.raises(RuntimeError), gc_pause.loading():
        raise RuntimeError("a model that does not load")
    assert gc.isenabled()
    with gc_pause.loading():  # and the next block works as the first did
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_caller_that_turned_the_collector_off_keeps_it_off(fresh_gc, monkeypatch):
    monkeypatch.setattr(gc_pause, "_freeze", True)
    gc.disable()
    with gc_pause.loading():
        pass
    assert not gc.isenabled()
    assert gc.get_freeze_count() == fresh_gc


def test_the_commands_own_process_freezes_what_loading_left(fresh_gc, monkeypatch):
    monkeypatch.setattr(gc_pause, "_freeze", True)
    with gc_pause.loading():
        loaded = [{"weights": [i]} for i in range(1000)]  # container objects: tracked by the collector
        with gc_pause.loading():
            pass
        assert gc.get_freeze_count() == fresh_gc  # frozen only when the outermost block exits
    assert gc.get_freeze_count() >= fresh_gc + len(loaded)
    assert gc.isenabled()


def test_the_console_entry_turns_freezing_on():
    code = (
        "import flowtrain.cli as cli, flowtrain.gc_pause as g\n"
        "cli.main = lambda: print('freeze', g._freeze) or 0\n"
        "cli.run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "freeze True"
    assert gc_pause._freeze is False  # importing flowtrain here (not its console entry) left it off
