"""The cyclic garbage collector paused while a command loads its models, and what they left frozen afterwards.

Why. Importing torch, diffusers and transformers and building the encoders and the transformer allocates a few
million objects that live as long as the process. CPython runs a full collection each time the long-lived objects
grow by a quarter, and each one walks all of them again: with the collector on, `flowtrain train --from` on the tiny
model reached its first step ~1.3 s (~15%) later on the 2-core dev VM, and its end-of-run work (plots, the LoRA file)
~1 s later (benchmarks/start.py). Those walks find almost nothing: the objects are alive.

How. `loading()` wraps the loading code of a verb (precompute's encoders, the training run's set-up, the sampling
pipeline, the captioning model): the collector is off inside it and back on when it exits, as it was. When the
process is flowtrain's own command (`freeze_after_loading`, set by the console entry), every object alive at that
exit is also moved to the permanent generation (`gc.freeze`): no later collection walks them again (a full one
during training stays cheap), and DataLoader workers forked afterwards leave their pages shared. Objects frozen
there are still freed by reference counting; only a reference cycle among them would stay until the process ends.
Called from Python (tests, notebooks), nothing is frozen: that process, and its other objects, are the caller's.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_freeze = False
_depth = 0


def freeze_after_loading(on: bool = True) -> None:
    """Freeze what is alive when the outermost `loading()` exits (this process is a flowtrain command's own)."""
    global _freeze
    _freeze = on


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """The collector off for the block (nested blocks: until the outermost exits), then as it was."""
    global _depth
    if _depth == 0 and not gc.isenabled():  # the caller turned it off: theirs to turn back on
        yield
        return
    _depth += 1
    gc.disable()
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            if _freeze:
                gc.freeze()
            gc.enable()
