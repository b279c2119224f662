"""`python -m flowtrain` (and `accelerate launch -m flowtrain train ...`)."""

from flowtrain.cli import run

run()
