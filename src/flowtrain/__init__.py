"""flowtrain: config-driven training for flow-matching text-to-image diffusion transformers."""

__version__ = "0.1.0"
