"""Benchmark cases per op. Each module's cases(device, quick) returns a list of Case."""
from benchmarks.cases import max_pool2d, relu

MODULES = {"relu": relu, "max_pool2d": max_pool2d}
