"""Benchmarks (never part of the test run): where time and memory go in OSEDiff and CCSR,
and every speed lever as a ratio against the official way of running the same models.

Entry point: ``python -m bench --help`` (bench/run.py). bench/tiling_bench.py is the
separate tiled-vs-untiled memory benchmark behind sr_core.tiling.COST_MODEL.
"""
