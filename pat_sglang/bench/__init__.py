"""Benchmark and profiling support shared by the scripts and tests: workloads, cases, graph timing, tuning variants.

Not used by the wrapper or the SGLang backend (production imports nothing from here).
"""
