"""Desk-check of the CUDA cross-entropy row walk (csrc/cross_entropy/cross_entropy_cuda_kernels.cuh,
row_span and walk_row, with the chunks of forward/backward_long_rows_kernel), runnable without a
GPU: for every phase of a row modulo 16 bytes, every pack width, team size and split, each class
is visited exactly once, every pack starts on a 16-byte boundary and holds classes of the row."""
from __future__ import annotations

import itertools

KUNROLL = 4


def row_span(offset_elems: int, V: int, C: int) -> tuple[int, int]:
    if V == 1:
        return 0, C
    h = min(C, (V - offset_elems % V) % V)
    return h, (C - h) // V


def walk(offset_elems, V, C, G, splits):
    """(class, width) visits of every thread of every chunk, as the kernels make them."""
    h, P = row_span(offset_elems, V, C)
    visits = []
    for k in range(splits):
        p0, p1 = k * P // splits, (k + 1) * P // splits
        head, tail = k == 0, k == splits - 1
        for lane in range(G):
            if head:
                visits += [(c, 1) for c in range(lane, h, G)]
            for p in range(p0 + lane, p1, G * KUNROLL):
                for u in range(KUNROLL):
                    if p + u * G < p1:
                        visits.append((h + (p + u * G) * V, V))
            if tail:
                visits += [(c, 1) for c in range(h + P * V + lane, C, G)]
    return visits


def test_every_class_once_and_packs_aligned():
    for V, G, splits in itertools.product((1, 2, 4, 8), (1, 8, 32, 256), (1, 3, 8)):
        for C in (1, 2, 7, 13, 16, 97, 1001, 4099):
            for offset in range(V):
                seen = [0] * C
                for c, width in walk(offset, V, C, G, splits):
                    assert 0 <= c and c + width <= C
                    if width > 1:
                        assert (offset + c) % V == 0  # a 16-byte boundary
                    for j in range(width):
                        seen[c + j] += 1
                assert seen == [1] * C, (V, G, splits, C, offset)
