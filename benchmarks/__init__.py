"""The benchmark, run from a checkout (`python -m benchmarks.benchmark`); not installed."""
