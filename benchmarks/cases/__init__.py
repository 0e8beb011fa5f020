"""Benchmark cases per op. Each module's cases(device, quick) returns a list of Case."""
from benchmarks.cases import relu

MODULES = {"relu": relu}
