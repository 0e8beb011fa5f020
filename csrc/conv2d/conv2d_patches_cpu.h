// Patch matrices for the GEMM convolution on the CPU: gathering receptive fields out of an image
// (im2col for NCHW, im2row for NHWC) and scattering their gradients back (col2im, row2im), one
// tile of output pixels at a time.
//
// Why they are fast: a tile is sized to stay in L2 (conv2d_gemm_cpu.cpp), so the GEMM that
// consumes it reads it from cache rather than memory. Every inner loop is a run over contiguous
// memory: with stride 1 an NCHW patch row is a shifted copy of an input row (a memcpy between two
// zero-filled margins), and an NHWC patch row is a sequence of contiguous channel runs; the
// out-of-image margins are computed once per run instead of tested per element. Scatters add
// with at::vec::Vectorized.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv2d/conv2d_common.h"

namespace dlext {
namespace conv2d_cpu {

// The outputs j in [0, n) whose input position base + j * step lies inside [0, length).
struct Span {
  int64_t lo, hi;
};

inline Span valid_span(int64_t base, int64_t step, int64_t length, int64_t n) {
  const int64_t lo = base >= 0 ? 0 : (-base + step - 1) / step;
  const int64_t hi = base >= length ? 0 : (length - 1 - base) / step + 1;
  return {std::min(lo, n), std::max(std::min(lo, n), std::min(hi, n))};
}

// dst[j] = src[j * step], j in [0, n). Runs are often only a few vectors long (a 10-pixel output
// row, 6 channels), so no library call: whole vectors, then one more vector ending exactly at the
// end (it rewrites a few elements with the same values) instead of a scalar tail.
template <typename T>
inline void gather_run(T* __restrict dst, const T* __restrict src, int64_t step, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  if (step != 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j * step];
  } else if (n >= V) {
    int64_t j = 0;
    for (; j + V <= n; j += V) Vec::loadu(src + j).store(dst + j);
    if (j < n) Vec::loadu(src + n - V).store(dst + n - V);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
  }
}

template <typename T>
inline void zero_run(T* dst, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  if (n >= V) {
    const Vec zero(T(0));
    int64_t j = 0;
    for (; j + V <= n; j += V) zero.store(dst + j);
    if (j < n) zero.store(dst + n - V);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = T(0);
  }
}

// dst[j * step] += src[j], j in [0, n).
template <typename T>
inline void scatter_add_run(T* __restrict dst, int64_t step, const T* __restrict src, int64_t n) {
  if (step == 1) {
    using Vec = at::vec::Vectorized<T>;
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      (Vec::loadu(dst + j) + Vec::loadu(src + j)).store(dst + j);
    }
    for (; j < n; ++j) dst[j] += src[j];
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j * step] += src[j];
  }
}

// Walks the output pixels [p0, p0 + tp) of a tile one output row segment at a time:
// fn(oh, ow_first, count, offset_in_tile).
template <typename Fn>
inline void for_each_row_segment(const Conv2dGeometry& g, int64_t p0, int64_t tp, const Fn& fn) {
  int64_t oh = p0 / g.Wo, ow = p0 % g.Wo, done = 0;
  while (done < tp) {
    const int64_t count = std::min(g.Wo - ow, tp - done);
    fn(oh, ow, count, done);
    done += count;
    ++oh;
    ow = 0;
  }
}

// For each output column ow, the taps s whose input column ow*sw - pl + s*dw is in the image.
// Computed once per tile: the divisions stay out of the per-pixel loops.
inline std::vector<Span> tap_spans(const Conv2dGeometry& g) {
  std::vector<Span> spans(g.Wo);
  for (int64_t ow = 0; ow < g.Wo; ++ow) {
    spans[ow] = valid_span(ow * g.stride_w - g.pad_l, g.dil_w, g.W, g.S);
  }
  return spans;
}

// Calls fn(offset_in_tile, n, in_image, src, span) for each output row segment of the tile, for
// one NCHW patch row (r, s): when the segment's input row is in the image, its outputs j in
// [span.lo, span.hi) read input element src + j * sw, the others are padding. The span of a whole
// output row is computed once.
template <typename Fn>
inline void for_each_patch_run(const Conv2dGeometry& g, int64_t p0, int64_t tp, int64_t r,
                               int64_t s, const Fn& fn) {
  const int64_t base = s * g.dil_w - g.pad_l;  // input column of output column 0
  const Span whole = valid_span(base, g.stride_w, g.W, g.Wo);
  for_each_row_segment(g, p0, tp, [&](int64_t oh, int64_t ow, int64_t n, int64_t at) {
    const int64_t ih = oh * g.stride_h - g.pad_t + r * g.dil_h;
    const int64_t iw0 = base + ow * g.stride_w;
    const Span v = ow == 0 && n == g.Wo ? whole : valid_span(iw0, g.stride_w, g.W, n);
    fn(at, n, ih >= 0 && ih < g.H, ih * g.W + iw0, v);
  });
}

// NCHW. x: one group of one image, (Cg, H, W) contiguous. col: (Cg*R*S, tp) row-major with
// leading dimension ld, row (c, r, s) holding input pixel (oh*sh - pt + r*dh, ow*sw - pl + s*dw)
// of channel c for each output pixel p0 <= p < p0 + tp, 0 where that falls in the padding.
template <typename T>
void im2col_tile(const T* x, const Conv2dGeometry& g, int64_t p0, int64_t tp, T* col,
                 int64_t ld) {
  for (int64_t c = 0; c < g.Cg; ++c) {
    const T* xc = x + c * g.H * g.W;
    for (int64_t r = 0; r < g.R; ++r) {
      for (int64_t s = 0; s < g.S; ++s) {
        T* row = col + ((c * g.R + r) * g.S + s) * ld;
        for_each_patch_run(g, p0, tp, r, s, [&](int64_t at, int64_t n, bool in_image,
                                                int64_t src, Span v) {
          T* dst = row + at;
          if (!in_image) {
            zero_run(dst, n);
            return;
          }
          zero_run(dst, v.lo);
          gather_run(dst + v.lo, xc + (src + v.lo * g.stride_w), g.stride_w, v.hi - v.lo);
          zero_run(dst + v.hi, n - v.hi);
        });
      }
    }
  }
}

// The adjoint of im2col_tile: dx (Cg, H, W) += the tile's patch gradients dcol (leading
// dimension ld); gradients that fall in the padding are dropped.
template <typename T>
void col2im_tile(const T* dcol, int64_t ld, const Conv2dGeometry& g, int64_t p0, int64_t tp,
                 T* dx) {
  for (int64_t c = 0; c < g.Cg; ++c) {
    T* dxc = dx + c * g.H * g.W;
    for (int64_t r = 0; r < g.R; ++r) {
      for (int64_t s = 0; s < g.S; ++s) {
        const T* row = dcol + ((c * g.R + r) * g.S + s) * ld;
        for_each_patch_run(g, p0, tp, r, s, [&](int64_t at, int64_t, bool in_image, int64_t src,
                                                Span v) {
          if (!in_image) return;
          scatter_add_run(dxc + (src + v.lo * g.stride_w), g.stride_w, row + at + v.lo,
                          v.hi - v.lo);
        });
      }
    }
  }
}

// NHWC. x: one image (H, W, C) contiguous, already offset to the group's first channel. rows:
// (tp, R*S*Cg) row-major, pixel p's receptive field in (r, s, c) order, so each (r, s) is one
// contiguous run of Cg channels; without groups and dilation along W, the taps of a kernel row
// are even one run of S*C (a 7x7 kernel on 3 channels: 7 copies of 21, not 49 of 3). spans:
// tap_spans(g).
template <typename T>
void im2row_tile(const T* x, const Conv2dGeometry& g, const std::vector<Span>& spans, int64_t p0,
                 int64_t tp, T* rows) {
  const int64_t D = g.patch(), run = g.Cg, SC = g.S * run;
  const bool joined = g.dil_w == 1 && g.Cg == g.C;  // a kernel row's taps are one run
  for_each_row_segment(g, p0, tp, [&](int64_t oh, int64_t ow0, int64_t n, int64_t at) {
    for (int64_t j = 0; j < n; ++j) {
      T* dst = rows + (at + j) * D;
      const int64_t ow = ow0 + j, iw0 = ow * g.stride_w - g.pad_l;
      const Span v = spans[ow];
      for (int64_t r = 0; r < g.R; ++r) {
        T* dr = dst + r * SC;
        const int64_t ih = oh * g.stride_h - g.pad_t + r * g.dil_h;
        if (ih < 0 || ih >= g.H) {
          zero_run(dr, SC);
          continue;
        }
        zero_run(dr, v.lo * run);
        if (joined) {
          gather_run(dr + v.lo * run, x + (ih * g.W + iw0 + v.lo) * g.C, 1, (v.hi - v.lo) * run);
        } else {
          for (int64_t s = v.lo; s < v.hi; ++s) {
            gather_run(dr + s * run, x + (ih * g.W + iw0 + s * g.dil_w) * g.C, 1, run);
          }
        }
        zero_run(dr + v.hi * run, (g.S - v.hi) * run);
      }
    }
  });
}

// The adjoint of im2row_tile: dx (H, W, C), offset to the group's first channel, += drows.
template <typename T>
void row2im_tile(const T* drows, const Conv2dGeometry& g, const std::vector<Span>& spans,
                 int64_t p0, int64_t tp, T* dx) {
  const int64_t D = g.patch(), run = g.Cg;
  const bool joined = g.dil_w == 1 && g.Cg == g.C;  // as in im2row_tile
  for_each_row_segment(g, p0, tp, [&](int64_t oh, int64_t ow0, int64_t n, int64_t at) {
    for (int64_t j = 0; j < n; ++j) {
      const T* src = drows + (at + j) * D;
      const int64_t ow = ow0 + j, iw0 = ow * g.stride_w - g.pad_l;
      const Span v = spans[ow];
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t ih = oh * g.stride_h - g.pad_t + r * g.dil_h;
        if (ih < 0 || ih >= g.H) continue;
        if (joined) {
          scatter_add_run(dx + (ih * g.W + iw0 + v.lo) * g.C, 1, src + (r * g.S + v.lo) * run,
                          (v.hi - v.lo) * run);
          continue;
        }
        for (int64_t s = v.lo; s < v.hi; ++s) {
          scatter_add_run(dx + (ih * g.W + iw0 + s * g.dil_w) * g.C, 1, src + (r * g.S + s) * run,
                          run);
        }
      }
    }
  });
}

}  // namespace conv2d_cpu
}  // namespace dlext
