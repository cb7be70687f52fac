"""Benchmarks: commands that print measured figures (ratios taken within one run)."""
