"""Benchmarks that print JSON: ``python -m vlmrel.bench <name> --json``."""
