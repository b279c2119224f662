"""How torch's OpenMP threads wait: chosen once per command, before torch loads (issue 11, case 9).

GNU OpenMP, which torch's CPU wheels use, lets a thread that ran out of work spin ~300,000 times before it sleeps.
That is the fastest choice when every core is free: the next parallel region starts without waking anyone. It is
a collapse as soon as another process wants a core: the spinning threads hold the cores the working thread needs,
and the tiny model's 25 ms step became 0.1-0.5 s (3-20×) on a shared 2-core machine. Passive waiting (sleep at
once) avoids the collapse but pays a wake-up per parallel region: 1.2-1.5× on that 25 ms step with the cores idle,
nothing measurable on a 1.5 s step (benchmarks/README.md, "OpenMP wait policy").

No single setting is best on both kinds of machine, and OpenMP reads its settings once, when torch loads. So
flowtrain looks at the machine at that moment: if the cores this process may run on are idle, OpenMP keeps its
own default (nothing gets slower on a quiet machine); if other processes take a quarter of a core or more of those
torch's threads will use, it sets `OMP_WAIT_POLICY=PASSIVE`. The look costs 0.1 s once per command; a machine that only
becomes busy later still gets the spinning, which `OMP_WAIT_POLICY=PASSIVE` avoids. A user's own OMP_WAIT_POLICY
or GOMP_SPINCOUNT always wins. This module must not import torch.
"""

from __future__ import annotations

import os
import sys
import time

# Other processes' load, in cores, from which waiting turns passive. An idle machine measures 0.00-0.05 here; one
# competing busy process measured 0.47-1.3 on 2 cores (the scheduler's share for a newcomer varies). A quarter of a
# core sits well between the two.
BUSY_CORES = 0.25
SAMPLE_S = 0.1  # long enough to average a scheduler tick's noise, short next to any command's start-up
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def wait_policy(env: dict[str, str], other_busy_cores: float | None) -> str | None:
    """The OMP_WAIT_POLICY to set, or None to leave the environment as it is.

    `other_busy_cores`: how much of the cores torch's threads will use other processes take (None: unknown).
    """
    if any(k in env for k in USER_KEYS):
        return None  # the user chose
    if other_busy_cores is not None and other_busy_cores < BUSY_CORES:
        return None  # idle cores: OpenMP's default spin-then-sleep is the fastest
    return "PASSIVE"  # busy, or unknowable: the choice that never collapses


def thread_cores(env: dict[str, str], cpus: int) -> int:
    """How many cores torch's OpenMP threads will use: OMP_NUM_THREADS if set (and valid), else every core this
    process may run on."""
    try:
        n = int(env.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        return cpus
    return max(1, min(n, cpus))


def other_busy_cores(cores: int, sample_s: float = SAMPLE_S) -> float | None:
    """How much of `cores` cores other processes take, measured by running one busy child per core for `sample_s`
    and counting the CPU time they got: `cores` minus the cores' worth they received. None where fork is
    unavailable.

    Why not /proc/stat or the load average: the load average trails by a minute, and some sandboxed VMs do not
    count idle time in /proc/stat at all (the one flowtrain is developed on, for one). Asking the scheduler
    directly works wherever processes run, and measures what matters here: whether `cores` threads of ours can
    run at the same time.
    """
    if not hasattr(os, "fork"):
        return None
    pids = []
    for _ in range(cores):
        pid = os.fork()  # before torch loads: the process has no threads yet, so fork is safe and cheap
        if pid == 0:
            # The child times itself: its CPU time from here, not the fork's or the exit's (tearing down a large
            # parent's copied address space costs more system time than the 0.1 s measured).
            cpu0, end = time.process_time(), time.perf_counter() + sample_s
            while time.perf_counter() < end:
                pass
            os._exit(min(100, round(100 * (time.process_time() - cpu0) / sample_s)))  # percent of a core it got
        pids.append(pid)
    got = sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids) / 100
    return max(0.0, cores - got)


def choose_wait_policy() -> str:
    """Set OMP_WAIT_POLICY in this process's environment where it helps; returns what was decided, for logs.

    Must run before torch is imported. Child processes inherit the setting.
    """
    if any(k in os.environ for k in USER_KEYS):
        return "set by the user"
    if "torch" in sys.modules:  # OpenMP has read its settings already (e.g. `main()` called from Python)
        return "fixed already: torch was loaded before flowtrain's command line ran"
    cores = thread_cores(dict(os.environ), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if cores == 1:
        return "not needed: one OpenMP thread never waits for another"
    busy = other_busy_cores(cores)
    policy = wait_policy(dict(os.environ), busy)
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
    load = "unknown" if busy is None else f"other processes took {busy:.2f} of the {cores} cores"
    return f"{policy or 'OpenMP default (spin, then sleep)'}: {load}"
