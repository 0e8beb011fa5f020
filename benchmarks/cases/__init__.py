"""Benchmark cases per op. Each module's cases(device, quick) returns a list of Case."""
from benchmarks.cases import conv2d, relu

MODULES = {"relu": relu, "conv2d": conv2d}
