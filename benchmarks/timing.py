"""Timers: medians over interleaved repetitions, with caches flushed or inputs rotated.

dlext and native are timed in alternation (one repetition each per round) so slow drift of the
machine (clock, other tenants) affects both alike. On CUDA each repetition is timed with events
after the L2 cache is flushed by a write to a buffer larger than it; on the CPU, callers rotate
over enough input copies that the working set exceeds the last-level cache.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

_l2_flush: dict[torch.device, torch.Tensor] = {}


def _flush_cuda_l2(device: torch.device) -> None:
    buf = _l2_flush.get(device)
    if buf is None:
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        buf = _l2_flush[device] = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8,
                                              device=device)
    buf.zero_()


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of fn (cold L2 on CUDA)."""
    if device.type == "cuda":
        _flush_cuda_l2(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(fns: dict[str, Callable[[], object]], device: torch.device, budget_s: float = 1.0,
            min_reps: int = 5, max_reps: int = 200, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call for each fn, timed interleaved within a total time budget."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    t_start = time.perf_counter()
    reps = 0
    while reps < max_reps and (reps < min_reps or time.perf_counter() - t_start < budget_s):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, device))
        reps += 1
    return {name: statistics.median(s) for name, s in samples.items()}


class Rotator:
    """Cycles through copies of a case's inputs so repeated calls do not hit a warm cache."""

    def __init__(self, make: Callable[[], tuple], bytes_per_set: int, device: torch.device,
                 cache_bytes: int = 64 << 20, max_sets: int = 8):
        n = 1 if device.type == "cuda" else max(1, min(max_sets, -(-cache_bytes // max(1, bytes_per_set))))
        self.sets = [make() for _ in range(n)]
        self.i = 0

    def next(self) -> tuple:
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]
