"""Benchmark cases per op. Each module's cases(device, quick) returns a list of Case."""
from benchmarks.cases import batch_norm, max_pool2d, relu

MODULES = {"relu": relu, "max_pool2d": max_pool2d, "batch_norm": batch_norm}

from benchmarks.cases import sync_batch_norm  # noqa: E402

MODULES["sync_batch_norm"] = sync_batch_norm
