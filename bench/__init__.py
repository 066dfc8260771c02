"""Benchmarks: each prints kiln's numbers beside a baseline measured in the same run."""
