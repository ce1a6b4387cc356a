"""Benchmarks: `python -m benchmarks` runs every module listed in MODULES and prints its table."""
MODULES = ("scoring", "evaluation", "stages", "padding")
