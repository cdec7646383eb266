"""Benchmarks and the main training job of adafisher_optax (run with ``python -m``)."""
