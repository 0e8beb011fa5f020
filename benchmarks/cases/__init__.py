"""Benchmark cases per op. Each module's cases(device, quick) returns a list of Case."""
from benchmarks.cases import (batch_norm, conv2d, cross_entropy, max_pool2d, relu,
                              sync_batch_norm, train_step)

MODULES = {"relu": relu, "conv2d": conv2d, "max_pool2d": max_pool2d, "batch_norm": batch_norm,
           "cross_entropy": cross_entropy, "sync_batch_norm": sync_batch_norm,
           "train_step": train_step}
