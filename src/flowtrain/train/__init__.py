"""Training: one explicit loop (`loop.train`), optimizers, checkpoints."""
