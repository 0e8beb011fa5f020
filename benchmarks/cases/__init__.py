"""Benchmark cases per op. Each module's cases(device, quick) returns a list of Case."""
from benchmarks.cases import batch_norm, relu

MODULES = {"relu": relu, "batch_norm": batch_norm}
