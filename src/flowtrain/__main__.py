"""`python -m flowtrain` (and `accelerate launch -m flowtrain train ...`)."""

import sys

from flowtrain.cli import main

sys.exit(main())
