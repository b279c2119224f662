"""`flowtrain launch …`: `accelerate launch …` that exits with the training processes' own exit code.

`accelerate launch` (torchrun's agent underneath) exits with 1 whenever a process fails, whatever the reason, so a
job script cannot tell a preemption that left a checkpoint (75) from a crash. This wrapper takes the same
arguments, runs the same launcher in-process, and returns `train.failures.launcher_exit_code` of the processes'
exit codes instead: 75 when every process stopped for a signal after writing the same checkpoint, the failing
process's code (2, 3, 74, …) when one failed.
"""

from __future__ import annotations

import subprocess
import sys

from flowtrain.train.failures import launcher_exit_code


def launch(argv: list[str]) -> int:
    """Run `accelerate launch argv`; 0 when every process succeeded, else the exit code of the cause."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:  # several processes: torchrun's agent reports each failed one
        first, _ = e.get_first_failure()
        codes = {rank: failure.exitcode for rank, failure in sorted(e.failures.items())}
        code = launcher_exit_code(codes, first)
        listed = ", ".join(f"rank {r}: {c}" for r, c in codes.items())
        print(f"flowtrain launch: processes failed ({listed}; first: rank {first}); exit code {code}", file=sys.stderr)
        return code
    except subprocess.CalledProcessError as e:  # one process: accelerate runs it as a plain subprocess
        return launcher_exit_code({0: e.returncode})
    return 0
