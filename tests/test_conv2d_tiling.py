"""Desk-check of the CUDA implicit-GEMM index math (csrc/conv2d/conv2d_igemm_cuda.cuh) on the CPU.

The device code cannot run here, so this file restates, in Python, (1) which tile elements each
thread of each loader fills, and (2) the gather predicates and offsets of the three passes
(forward, backward-data, backward-weight with split-K) plus the epilogue's output offsets, and
checks that they enumerate exactly the right products: the model's results must equal native
convolutions in float64, for shapes with padding, stride, dilation, groups and ragged tiles.
If the kernels' formulas change, change them here too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

K_BYTES = 64          # BK in bytes (kTileKBytes)
FAR = -(1 << 30)      # kFar
# (element size, BM, BN, THREADS) of every instantiated tile: tensor cores for 2- and 4-byte
# types, FMA for all four sizes.
SHAPES = [(es, 128, 128, 256) for es in (2, 4)] + [(es, 128, 64, 128) for es in (2, 4)] + \
         [(es, 64, 64, 128) for es in (2, 4)] + [(es, 64, 64, 256) for es in (2, 4, 8)]


@pytest.mark.parametrize("es,bm,bn,threads", SHAPES)
def test_every_tile_element_is_filled_once(es, bm, bn, threads):
    bk, v = K_BYTES // es, 16 // es
    nv_a, nv_b = bm * 4 // threads, bn * 4 // threads
    for rows, nv in ((bm, nv_a), (bn, nv_b)):
        depth_tile = []   # DepthLoader: column tid % 4, rows tid / 4 + i * threads / 4
        pixel_tile = []   # PixelLoader: depth column tid % bk, row vectors tid / bk + i * threads / bk
        for tid in range(threads):
            for i in range(nv):
                row = tid // 4 + i * (threads // 4)
                depth_tile += [(row, (tid % 4) * v + e) for e in range(v)]
                rv = tid // bk + i * (threads // bk)
                pixel_tile += [(rv * v + e, tid % bk) for e in range(v)]
        expected = sorted((r, k) for r in range(rows) for k in range(bk))
        assert sorted(depth_tile) == expected
        assert sorted(pixel_tile) == expected


def split(idx, *sizes):
    """Row-major coordinates of flat indices over `sizes` (the kernels' divisions)."""
    out = []
    for size in reversed(sizes[1:]):
        out.append(idx % size)
        idx = idx // size
    return [idx] + out[::-1]


class Model:
    """The kernels' formulas over whole index tensors; `g` mirrors IGemmArgs."""

    def __init__(self, x, w, stride, pad, dil, groups):
        self.N, self.C, self.H, self.W = x.shape
        self.K, self.Cg, self.R, self.S = w.shape
        self.G, self.Kg = groups, self.K // groups
        (self.sh, self.sw), (self.pt, self.pb, self.pl, self.pr), (self.dh, self.dw) = \
            stride, pad, dil
        self.Ho = (self.H + self.pt + self.pb - self.dh * (self.R - 1) - 1) // self.sh + 1
        self.Wo = (self.W + self.pl + self.pr - self.dw * (self.S - 1) - 1) // self.sw + 1

    @staticmethod
    def take(flat, off):
        return torch.where(off >= 0, flat[off.clamp_min(0)], torch.zeros((), dtype=flat.dtype))

    def forward_a(self, x_nhwc, grp, m, kk):
        """DepthLoader, forward: rows m = (n, p, q), depth kk = (r, s, c)."""
        n, p, q = split(m, self.N, self.Ho, self.Wo)
        a_base = n * self.H * self.W * self.C + grp * self.Cg
        a_h = torch.where(m < self.N * self.Ho * self.Wo, p * self.sh - self.pt, FAR)
        a_w = torch.where(m < self.N * self.Ho * self.Wo, q * self.sw - self.pl, FAR)
        rs, ch = kk // self.Cg, kk % self.Cg
        r, s = rs // self.S, rs % self.S
        h, v = a_h + r * self.dh, a_w + s * self.dw
        ok = (kk < self.R * self.S * self.Cg) & (h >= 0) & (h < self.H) & (v >= 0) & (v < self.W)
        return self.take(x_nhwc, torch.where(ok, a_base + (h * self.W + v) * self.C + ch, -1))

    def backward_data_a(self, dy_nhwc, grp, m, kk):
        """DepthLoader, backward-data: rows m = (n, h, w), depth kk = (r, s, k)."""
        n, h, v = split(m, self.N, self.H, self.W)
        a_base = n * self.Ho * self.Wo * self.K + grp * self.Kg
        a_h = torch.where(m < self.N * self.H * self.W, h + self.pt, FAR)
        a_w = torch.where(m < self.N * self.H * self.W, v + self.pl, FAR)
        rs, ch = kk // self.Kg, kk % self.Kg
        r, s = rs // self.S, rs % self.S
        ph, pw = a_h - r * self.dh, a_w - s * self.dw
        ok = (kk < self.R * self.S * self.Kg) & (ph >= 0) & (pw >= 0)
        p, q = ph.clamp_min(0) // self.sh, pw.clamp_min(0) // self.sw
        ok &= (p * self.sh == ph) & (q * self.sw == pw) & (p < self.Ho) & (q < self.Wo)
        return self.take(dy_nhwc, torch.where(ok, a_base + (p * self.Wo + q) * self.K + ch, -1))

    def backward_weight_b(self, x_nhwc, grp, j, pix):
        """PixelLoader B: rows j = (r, s, c), depth pix = (n, p, q)."""
        rs, c = j // self.Cg, j % self.Cg
        r, s = rs // self.S, rs % self.S
        n, p, q = split(pix, self.N, self.Ho, self.Wo)
        h, v = p * self.sh - self.pt + r * self.dh, q * self.sw - self.pl + s * self.dw
        ok = (pix < self.N * self.Ho * self.Wo) & (j < self.R * self.S * self.Cg)
        ok &= (h >= 0) & (h < self.H) & (v >= 0) & (v < self.W)
        off = n * self.H * self.W * self.C + (h * self.W + v) * self.C + grp * self.Cg + c
        return self.take(x_nhwc, torch.where(ok, off, -1))


def gemm(rows, cols, depth, a_of, b_of, bm, bn, bk, splits=1):
    """The block loop: tiles of bm x bn over slices of bk-deep steps; ragged edges included."""
    out = torch.zeros(splits, rows, cols, dtype=torch.float64)
    ktiles = -(-depth // bk)
    per_split = -(-ktiles // splits)
    for m0 in range(0, rows, bm):
        for n0 in range(0, cols, bn):
            m = torch.arange(m0, m0 + bm).view(-1, 1)
            j = torch.arange(n0, n0 + bn).view(-1, 1)
            for sp in range(splits):
                acc = torch.zeros(bm, bn, dtype=torch.float64)
                for kt in range(sp * per_split, min(ktiles, (sp + 1) * per_split)):
                    kk = torch.arange(kt * bk, kt * bk + bk).view(1, -1)
                    acc += a_of(m, kk) @ b_of(j, kk).T
                keep = acc[: min(bm, rows - m0), : min(bn, cols - n0)]
                out[sp, m0:m0 + keep.shape[0], n0:n0 + keep.shape[1]] = keep
    return out.sum(0)  # splitk_reduce: slices added in order


CASES = [  # x, w, stride, padding [t, b, l, r], dilation, groups
    ((2, 3, 9, 11), (5, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((2, 4, 13, 12), (6, 2, 3, 2), (2, 3), (2, 1, 0, 2), (2, 3), 2),
    ((1, 6, 7, 8), (10, 3, 4, 4), (1, 1), (1, 2, 2, 1), (1, 1), 2),  # 'same' with an even kernel
    ((3, 8, 5, 6), (12, 8, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    ((2, 2, 11, 9), (4, 1, 5, 3), (3, 2), (2, 2, 1, 1), (1, 2), 2),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("bm,bn,bk", [(64, 64, 16), (16, 8, 8)])
def test_gathers_and_epilogue_compute_the_convolution(case, bm, bn, bk):
    xs, ws, stride, pad, dil, groups = case
    torch.manual_seed(0)
    x = torch.randn(xs, dtype=torch.float64)
    w = torch.randn(ws, dtype=torch.float64)
    g = Model(x, w, stride, pad, dil, groups)
    padded = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    y_ref = F.conv2d(padded, w, None, stride, 0, dil, groups)
    dy = torch.randn(y_ref.shape, dtype=torch.float64)
    xr = padded.detach().requires_grad_()
    wr = w.clone().requires_grad_()
    F.conv2d(xr, wr, None, stride, 0, dil, groups).backward(dy)
    dx_ref = xr.grad[:, :, pad[0]:pad[0] + g.H, pad[2]:pad[2] + g.W]

    x_nhwc = x.permute(0, 2, 3, 1).reshape(-1)
    dy_nhwc = dy.permute(0, 2, 3, 1).reshape(-1)
    w_krsc = w.permute(0, 2, 3, 1).reshape(-1)
    # Backward-data's B: the weight as [G][Cg][R][S][Kg].
    w_t = w.reshape(groups, g.Kg, g.Cg, g.R, g.S).permute(0, 2, 3, 4, 1).reshape(-1)
    y = torch.empty(g.N, g.K, g.Ho, g.Wo, dtype=torch.float64)
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)
    for grp in range(groups):
        # Forward: B row j at (grp * cols + j) * depth + kk, zero past the group's columns.
        depth, cols = g.R * g.S * g.Cg, g.Kg
        out = gemm(g.N * g.Ho * g.Wo, cols, depth,
                   lambda m, kk: g.forward_a(x_nhwc, grp, m, kk),
                   lambda j, kk: Model.take(w_krsc, torch.where(
                       (j < cols) & (kk < depth), (grp * cols + j) * depth + kk, -1)), bm, bn, bk)
        # Epilogue: row m -> (n, p, q), column j -> channel grp * Kg + j.
        n, p, q = split(torch.arange(out.shape[0]), g.N, g.Ho, g.Wo)
        y[n, grp * g.Kg:(grp + 1) * g.Kg, p, q] = out
        depth, cols = g.R * g.S * g.Kg, g.Cg
        out = gemm(g.N * g.H * g.W, cols, depth,
                   lambda m, kk: g.backward_data_a(dy_nhwc, grp, m, kk),
                   lambda j, kk: Model.take(w_t, torch.where(
                       (j < cols) & (kk < depth), (grp * cols + j) * depth + kk, -1)), bm, bn, bk)
        n, h, v = split(torch.arange(out.shape[0]), g.N, g.H, g.W)
        dx[n, grp * g.Cg:(grp + 1) * g.Cg, h, v] = out
        # Backward-weight: A[i, pix] = dy[pix, grp * Kg + i]; three slices of the depth.
        rows, cols = g.Kg, g.R * g.S * g.Cg
        out = gemm(rows, cols, g.N * g.Ho * g.Wo,
                   lambda i, pix: Model.take(dy_nhwc, torch.where(
                       (i < rows) & (pix < g.N * g.Ho * g.Wo), pix * g.K + grp * g.Kg + i, -1)),
                   lambda j, pix: g.backward_weight_b(x_nhwc, grp, j, pix), bm, bn, bk,
                   splits=3)
        rs, c = split(torch.arange(cols), g.R * g.S, g.Cg)
        r, s = split(rs, g.R, g.S)
        dw[grp * g.Kg:(grp + 1) * g.Kg, c, r, s] = out
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-12, atol=1e-12)
