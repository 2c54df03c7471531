"""Benchmarks: offline throughput and step times."""
