"""flowtrain: config-driven training for flow-matching text-to-image diffusion transformers."""

import os

from flowtrain.track.mlflow_store import telemetry_off_by_default

__version__ = "0.1.0"

# In every process that imports flowtrain, before anything can import MLflow: not only flowtrain's tracker does
# (DeepSpeed imports it whenever it is installed), and MLflow starts its usage telemetry at import. See
# `telemetry_off_by_default`: the user's own MLFLOW_DISABLE_TELEMETRY wins.
telemetry_off_by_default(os.environ)
