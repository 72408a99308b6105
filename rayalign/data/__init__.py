"""Datasets: prompt files (JSONL / Parquet) and the datasets shipped with rayalign."""
