"""Benchmark harness behind ``protonorm bench``."""
