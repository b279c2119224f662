"""Data pipeline: source listing, raw Parquet shards (`prepare`) and the readers built on them."""
