"""Offline building blocks for tests, benchmarks and the demo: tiny models, tiny datasets, tiny configs."""
