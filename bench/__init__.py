"""Benchmarks of glora-math (run as modules: ``python -m bench.aggregate``)."""
