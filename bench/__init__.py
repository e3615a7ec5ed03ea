"""Benchmarks of abdag on the real local stack (see bench/run_all.py and docs/benchmarks.md)."""
