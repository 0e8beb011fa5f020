"""Benchmark cases per op. Each module's cases(device, quick) returns a list of Case."""
from benchmarks.cases import cross_entropy, relu

MODULES = {"relu": relu, "cross_entropy": cross_entropy}
