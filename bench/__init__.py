"""Benchmarks: foldserve bench (bench/suite.py)."""
