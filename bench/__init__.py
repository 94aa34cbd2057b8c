"""Benchmarks: each module measures ours next to a reference, in one run, and reports ratios."""
