"""Ending a command's process without the interpreter's teardown, once everything it wrote is closed.

Why. After `main()` returns, CPython's teardown frees every module and object one by one and then runs the C++
static destructors of the libraries it loaded. With torch, diffusers and transformers imported that took 1.5-1.7 s
on the 2-core dev VM, and it is also where the process's resident memory peaked: freeing touches pages the run
never needed again, and the static destructors page in code of `libtorch*` (+60 to +120 MiB over the run's own
peak, measured from outside with `wait4`; `benchmarks/start.py`). Nothing that teardown does is needed by a
command that has already closed its files: the operating system takes the memory back at once.

What is kept, in the order `Py_FinalizeEx` does it: the non-daemon threads are joined, the `atexit` callbacks run
(logging's flush, `weakref.finalize`, multiprocessing's clean-up of its children, trackers' own exit hooks), and
stdout / stderr are flushed. Only then does the process end, with the command's exit code.

Only the console entry (`flowtrain ...`, `python -m flowtrain ...`) and the MLflow child call this; `cli.main()`
called from Python (tests, notebooks) returns as before. `FLOWTRAIN_FULL_EXIT=1` keeps the full teardown (for
tools that inspect objects as the interpreter ends).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn

FULL_EXIT_ENV = "FLOWTRAIN_FULL_EXIT"


def exit_now(code: int | None) -> NoReturn:
    """End the process with `code` (None: 0) after what `Py_FinalizeEx` does that matters for files and children."""
    code = 0 if code is None else int(code)
    if os.environ.get(FULL_EXIT_ENV, "") not in ("", "0"):
        sys.exit(code)
    main = threading.main_thread()
    for t in threading.enumerate():
        if t is not main and not t.daemon:
            t.join()
    try:
        atexit._run_exitfuncs()  # noqa: SLF001  the callbacks CPython's teardown would run; no public equivalent
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):  # closed or replaced: nothing to flush
                stream.flush()
        os._exit(code)
