"""Kernel benchmarks: real diffusion shapes, contenders, timing, rooflines, reports.

Used by `attnctl bench`, the pytest-benchmark suite in bench/ and bench/bench_attention.py.
Numbers taken on a CPU are smoke runs: they exercise the code and mean nothing for speed.
"""
