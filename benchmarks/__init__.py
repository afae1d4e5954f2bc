"""diffboost benchmarks: one timing harness (`benchmarks.harness`) shared by every benchmark script.

Run a benchmark from the repository root, e.g. ``python -m benchmarks.bench_attention``; render recorded
results with ``python -m benchmarks.report benchmarks/results/*.json``.
"""
