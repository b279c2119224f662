"""Moved to `flowtrain.track.jsonl` (the JSONL tracker); these names stay importable from here."""

from flowtrain.track.jsonl import JsonlMetrics, JsonlTracker, read_metrics

__all__ = ["JsonlMetrics", "JsonlTracker", "read_metrics"]
