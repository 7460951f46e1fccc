"""``pulse bench``: side-by-side benchmarks of the pipeline against a floor and baselines.

A development distribution (``bench/pyproject.toml``, ``pulse-bench``), not part of the shipped
wheel; ``pulse bench`` and ``python -m pulse_bench`` run it.
"""
