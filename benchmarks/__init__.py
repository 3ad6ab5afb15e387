"""Benchmarks: ratios measured in one run (``python -m benchmarks.<name> --help``); not tests, no assertions on time."""
