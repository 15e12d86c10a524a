"""Benchmarks that measure the paper's claims on this code (not timed tests)."""
