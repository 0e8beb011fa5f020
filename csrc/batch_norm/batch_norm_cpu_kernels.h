// The CPU BatchNorm kernels, in the four parts a synchronised multi-process BatchNorm needs:
//
//   statistics        per channel: count, mean and M2 = sum (x - mean)^2 of the input
//   normalise         y = (x - mean) * scale + shift, scale = invstd * weight, shift = bias
//   backward reduce   per channel: sum dy and sum dy * (x - mean)
//   backward apply    training: dx = (dy - mean_dy - (x - mean) * k) * a, k = invstd^2 *
//                     mean(dy * (x - mean)), a = invstd * weight; eval: dx = dy * a
//
// and the fused single-process passes built from the same pieces (statistics then normalise,
// reduce then apply), which on NCHW inputs finish each channel while it is still in cache.
//
// Layouts. The input is dense in torch's suggested memory format and is seen as (N, C, L), L the
// product of the spatial sizes, in one of two layouts:
//   planes  NC(L) contiguous: channel c is N planes of L contiguous values, plane (n, c) starting
//           at (n * C + c) * L;
//   rows    channels innermost (channels_last, or L == 1): M = N * L rows of C values.
//
// Why it is fast. Memory-bound work, so each part reads its operands once from memory:
//   - Statistics use two passes over cache-sized segments (kSegment values): the segment's sum,
//     then its squared deviations from its own mean while it is still in L2; segments merge
//     with Chan et al.'s parallel-variance formula. Numerically this is the two-pass variance
//     (never E[x^2] - E[x]^2), at the memory cost of one pass. Values are shifted by a reference
//     value of their channel (its first value, when finite) before they are summed, so sums of
//     data far from 0 (mean 1e4, spread 1e-2) keep their digits: x - shift is exact there.
//   - planes: vectorised along L; threads split the channels, and each thread finishes its
//     channel (statistics -> normalise, reduce -> apply) while the channel is in its L2, so the
//     fused passes read the input from memory once. With too few channels to balance the
//     threads, the groups of segments of every channel are spread over the threads instead, and
//     the parts run as separate passes.
//   - rows: vectorised across channels with per-channel accumulators in L1; threads split the
//     rows into fixed groups whose partial results are merged in group order.
//
// Determinism. The segments, groups and the order of every merge depend on the shape only, never
// on the number of threads, so results are bitwise identical for any thread count. No atomics.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "batch_norm/batch_norm_cpu_vec.h"
#include "common/cpu_loops.h"

namespace dlext {
namespace bn_cpu {

// Values per statistics segment: at most 128 KiB (float64), well inside a core's L2.
constexpr int64_t kSegment = 16384;
// Partial results kept per channel (planes) or for the whole tensor (rows) before the last merge.
constexpr int64_t kMaxGroups = 32;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geometry {
  int64_t N, C, L;
  bool rows;
  int64_t count() const { return N * L; }  // values per channel (and rows of the rows layout)
};

template <typename acc_t>
struct Affine {  // y = (x - mean) * scale + shift
  acc_t mean, scale, shift;
};

template <typename acc_t>
struct GradCoeffs {  // dx = (dy - mean_dy - (x - mean) * k) * a
  acc_t mean, mean_dy, k, a;
};

// ------------------------------------------------------------------------------------ grids

// Planes: a channel's N * L values cut into segments (several whole planes, or one piece of a
// plane longer than kSegment), and the segments into at most kMaxGroups consecutive groups.
struct PlaneGrid {
  int64_t N, L, pieces, planes, segments, groups;

  explicit PlaneGrid(const Geometry& g) : N(g.N), L(g.L) {
    pieces = divup(L, kSegment);
    planes = pieces > 1 ? 1 : std::max<int64_t>(1, kSegment / L);
    segments = pieces > 1 ? N * pieces : divup(N, planes);
    groups = std::min(segments, kMaxGroups);
  }
  // Segment s: positions [l0, l1) of planes [n0, n1).
  void segment(int64_t s, int64_t& n0, int64_t& n1, int64_t& l0, int64_t& l1) const {
    if (pieces > 1) {
      n0 = s / pieces;
      n1 = n0 + 1;
      const int64_t p = s % pieces;
      l0 = p * L / pieces;
      l1 = (p + 1) * L / pieces;
    } else {
      n0 = s * planes;
      n1 = std::min(N, n0 + planes);
      l0 = 0;
      l1 = L;
    }
  }
  int64_t group_begin(int64_t grp) const { return grp * segments / groups; }
};

// Rows: blocks of about kSegment values (whole rows), and the blocks into at most kMaxGroups
// consecutive groups.
struct RowGrid {
  int64_t M, block_rows, blocks, groups;

  explicit RowGrid(const Geometry& g) : M(g.count()) {
    block_rows = std::max<int64_t>(1, kSegment / g.C);
    blocks = divup(M, block_rows);
    groups = std::min(blocks, kMaxGroups);
  }
  int64_t group_row_begin(int64_t grp) const {
    return std::min(M, (grp * blocks / groups) * block_rows);
  }
};

// Whether threads split the channels (planes layout with enough channels to balance them).
inline bool split_channels(const Geometry& g) {
  if (g.rows) return false;
  const int64_t t = at::get_num_threads();
  return g.C % t == 0 || g.C >= 4 * t;
}

// Channels per task, so that a task has at least cpu::kGrain values.
inline int64_t channel_grain(const Geometry& g) {
  return std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(1, g.count()));
}

// ------------------------------------------------------------------ contiguous-run reductions

// sum (x - shift), and sum (x - shift - mean)^2, over runs of contiguous values: four vector
// accumulators, then the lanes in order.
template <typename T>
struct Sum {
  using acc_t = acc_type<T>;
  using V = AccVec<T>;
  static constexpr int64_t W = kW<T>;
  V v0 = V(0), v1 = V(0), v2 = V(0), v3 = V(0);
  acc_t tail = 0;

  // sum (x - shift)
  void add_values(const T* x, int64_t len, acc_t shift) {
    const V k(shift);
    int64_t i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      v0 += load_acc(x + i) - k;
      v1 += load_acc(x + i + W) - k;
      v2 += load_acc(x + i + 2 * W) - k;
      v3 += load_acc(x + i + 3 * W) - k;
    }
    for (; i + W <= len; i += W) v0 += load_acc(x + i) - k;
    for (; i < len; ++i) tail += static_cast<acc_t>(x[i]) - shift;
  }
  // sum ((x - shift) - mean)^2, mean being the mean of x - shift
  void add_squared_deviations(const T* x, int64_t len, acc_t shift, acc_t mean) {
    const V k(shift), m(mean);
    int64_t i = 0;
    for (; i + 4 * W <= len; i += 4 * W) {
      const V d0 = (load_acc(x + i) - k) - m, d1 = (load_acc(x + i + W) - k) - m;
      const V d2 = (load_acc(x + i + 2 * W) - k) - m, d3 = (load_acc(x + i + 3 * W) - k) - m;
      v0 = at::vec::fmadd(d0, d0, v0);
      v1 = at::vec::fmadd(d1, d1, v1);
      v2 = at::vec::fmadd(d2, d2, v2);
      v3 = at::vec::fmadd(d3, d3, v3);
    }
    for (; i + W <= len; i += W) {
      const V d = (load_acc(x + i) - k) - m;
      v0 = at::vec::fmadd(d, d, v0);
    }
    for (; i < len; ++i) {
      const acc_t d = (static_cast<acc_t>(x[i]) - shift) - mean;
      tail += d * d;
    }
  }
  acc_t total() const { return lane_sum((v0 + v1) + (v2 + v3)) + tail; }
};

// sum dy and sum dy * (x - mean) over runs of contiguous values.
template <typename T>
struct GradSums {
  using acc_t = acc_type<T>;
  using V = AccVec<T>;
  static constexpr int64_t W = kW<T>;
  V s0 = V(0), s1 = V(0), p0 = V(0), p1 = V(0);
  acc_t s_tail = 0, p_tail = 0;

  void add(const T* dy, const T* x, int64_t len, acc_t mean) {
    const V m(mean);
    int64_t i = 0;
    for (; i + 2 * W <= len; i += 2 * W) {
      const V g0 = load_acc(dy + i), g1 = load_acc(dy + i + W);
      s0 += g0;
      s1 += g1;
      p0 = at::vec::fmadd(g0, load_acc(x + i) - m, p0);
      p1 = at::vec::fmadd(g1, load_acc(x + i + W) - m, p1);
    }
    for (; i + W <= len; i += W) {
      const V g0 = load_acc(dy + i);
      s0 += g0;
      p0 = at::vec::fmadd(g0, load_acc(x + i) - m, p0);
    }
    for (; i < len; ++i) {
      const acc_t g = static_cast<acc_t>(dy[i]);
      s_tail += g;
      p_tail += g * (static_cast<acc_t>(x[i]) - mean);
    }
  }
  acc_t sum_dy() const { return lane_sum(s0 + s1) + s_tail; }
  acc_t sum_dy_xmu() const { return lane_sum(p0 + p1) + p_tail; }
};

// ------------------------------------------------------------------------ elementwise runs

template <typename T>
inline void normalise_run(const T* x, T* y, int64_t len, const Affine<acc_type<T>>& a) {
  using V = AccVec<T>;
  constexpr int64_t W = kW<T>;
  const V m(a.mean), s(a.scale), b(a.shift);
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const V x0 = load_acc(x + i), x1 = load_acc(x + i + W);
    store_acc(y + i, at::vec::fmadd(x0 - m, s, b));
    store_acc(y + i + W, at::vec::fmadd(x1 - m, s, b));
  }
  for (; i + W <= len; i += W) store_acc(y + i, at::vec::fmadd(load_acc(x + i) - m, s, b));
  for (; i < len; ++i) {
    y[i] = static_cast<T>((static_cast<acc_type<T>>(x[i]) - a.mean) * a.scale + a.shift);
  }
}

template <typename T>
inline void grad_train_run(const T* dy, const T* x, T* dx, int64_t len,
                           const GradCoeffs<acc_type<T>>& c) {
  using V = AccVec<T>;
  using acc_t = acc_type<T>;
  constexpr int64_t W = kW<T>;
  const V m(c.mean), mdy(c.mean_dy), k(c.k), a(c.a);
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const V g0 = load_acc(dy + i), g1 = load_acc(dy + i + W);
    const V x0 = load_acc(x + i), x1 = load_acc(x + i + W);
    store_acc(dx + i, at::vec::fnmadd(x0 - m, k, g0 - mdy) * a);
    store_acc(dx + i + W, at::vec::fnmadd(x1 - m, k, g1 - mdy) * a);
  }
  for (; i + W <= len; i += W) {
    store_acc(dx + i, at::vec::fnmadd(load_acc(x + i) - m, k, load_acc(dy + i) - mdy) * a);
  }
  for (; i < len; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]) - c.mean_dy;
    dx[i] = static_cast<T>((g - (static_cast<acc_t>(x[i]) - c.mean) * c.k) * c.a);
  }
}

template <typename T>
inline void grad_eval_run(const T* dy, T* dx, int64_t len, acc_type<T> a) {
  using V = AccVec<T>;
  constexpr int64_t W = kW<T>;
  const V va(a);
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const V g0 = load_acc(dy + i), g1 = load_acc(dy + i + W);
    store_acc(dx + i, g0 * va);
    store_acc(dx + i + W, g1 * va);
  }
  for (; i + W <= len; i += W) store_acc(dx + i, load_acc(dy + i) * va);
  for (; i < len; ++i) dx[i] = static_cast<T>(static_cast<acc_type<T>>(dy[i]) * a);
}

// The reference value moments of channel c are computed relative to: its first value, or 0
// when that is not finite (so an infinite value gives torch's infinite mean).
template <typename T>
acc_type<T> channel_shift(const T* x, const Geometry& g, int64_t c) {
  const acc_type<T> v = static_cast<acc_type<T>>(x[g.rows ? c : c * g.L]);
  return std::isfinite(v) ? v : acc_type<T>(0);
}

// ------------------------------------------------------------------------ planes: per channel

// Moments of segment s of channel c, of the values shifted by `shift`.
template <typename T>
Moments<acc_type<T>> plane_segment_moments(const T* x, const Geometry& g, const PlaneGrid& grid,
                                           int64_t c, int64_t s, acc_type<T> shift) {
  using acc_t = acc_type<T>;
  int64_t n0, n1, l0, l1;
  grid.segment(s, n0, n1, l0, l1);
  const int64_t len = l1 - l0;
  Sum<T> sum;
  for (int64_t n = n0; n < n1; ++n) sum.add_values(x + (n * g.C + c) * g.L + l0, len, shift);
  Moments<acc_t> m;
  m.n = (n1 - n0) * len;
  m.mean = sum.total() / static_cast<acc_t>(m.n);
  Sum<T> sq;  // second pass: the segment is in cache
  for (int64_t n = n0; n < n1; ++n) {
    sq.add_squared_deviations(x + (n * g.C + c) * g.L + l0, len, shift, m.mean);
  }
  m.m2 = sq.total();
  return m;
}

template <typename T>
Moments<acc_type<T>> plane_group_moments(const T* x, const Geometry& g, const PlaneGrid& grid,
                                         int64_t c, int64_t grp, acc_type<T> shift) {
  Moments<acc_type<T>> m;
  for (int64_t s = grid.group_begin(grp); s < grid.group_begin(grp + 1); ++s) {
    merge(m, plane_segment_moments(x, g, grid, c, s, shift));
  }
  return m;
}

// Moments of channel c (mean unshifted).
template <typename T>
Moments<acc_type<T>> plane_channel_moments(const T* x, const Geometry& g, const PlaneGrid& grid,
                                           int64_t c) {
  const acc_type<T> shift = channel_shift(x, g, c);
  Moments<acc_type<T>> m;
  for (int64_t grp = 0; grp < grid.groups; ++grp) {
    merge(m, plane_group_moments(x, g, grid, c, grp, shift));
  }
  m.mean += shift;
  return m;
}

// (sum dy, sum dy * (x - mean)) of one group of segments of channel c.
template <typename T>
std::pair<acc_type<T>, acc_type<T>> plane_group_sums(const T* dy, const T* x, const Geometry& g,
                                                     const PlaneGrid& grid, int64_t c,
                                                     int64_t grp, acc_type<T> mean) {
  acc_type<T> sdy = 0, sdxm = 0;
  for (int64_t s = grid.group_begin(grp); s < grid.group_begin(grp + 1); ++s) {
    int64_t n0, n1, l0, l1;
    grid.segment(s, n0, n1, l0, l1);
    GradSums<T> sums;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t off = (n * g.C + c) * g.L + l0;
      sums.add(dy + off, x + off, l1 - l0, mean);
    }
    sdy += sums.sum_dy();
    sdxm += sums.sum_dy_xmu();
  }
  return {sdy, sdxm};
}

template <typename T>
std::pair<acc_type<T>, acc_type<T>> plane_channel_sums(const T* dy, const T* x, const Geometry& g,
                                                       const PlaneGrid& grid, int64_t c,
                                                       acc_type<T> mean) {
  acc_type<T> sdy = 0, sdxm = 0;
  for (int64_t grp = 0; grp < grid.groups; ++grp) {
    const auto s = plane_group_sums(dy, x, g, grid, c, grp, mean);
    sdy += s.first;
    sdxm += s.second;
  }
  return {sdy, sdxm};
}

// Calls f(c, offset, len) for the runs of consecutive values of elements [begin, end).
template <typename F>
inline void for_each_plane_run(const Geometry& g, int64_t begin, int64_t end, const F& f) {
  int64_t plane = begin / g.L;
  int64_t pos = begin;
  while (pos < end) {
    const int64_t len = std::min(end, (plane + 1) * g.L) - pos;
    f(plane % g.C, pos, len);
    pos += len;
    ++plane;
  }
}

// ---------------------------------------------------------------------- rows: all channels

// Rows are walked in memory order, which keeps the hardware prefetchers streaming (walking a few
// rows at once to hold accumulators in registers measured slower once data comes from DRAM);
// per-channel accumulators and coefficients are C values that stay in L1.
//
// Over rows [begin, end): vf(i, c) for each full vector of channels of a row (i the index of
// its first value, c its channel), then sf(i, c) for each remaining value.
template <typename T, typename VF, typename SF>
inline void for_each_row(int64_t C, int64_t begin, int64_t end, const VF& vf, const SF& sf) {
  constexpr int64_t W = kW<T>;
  for (int64_t r = begin; r < end; ++r) {
    int64_t c = 0;
    for (; c + W <= C; c += W) vf(r * C + c, c);
    for (; c < C; ++c) sf(r * C + c, c);
  }
}

// Moments of rows [rb, re) for every channel, of the values shifted by shift[c]: the block's
// sums, then its squared deviations from its own means while it is in cache. mean and m2 hold C
// values.
template <typename T>
void rows_block_moments(const T* x, int64_t C, int64_t rb, int64_t re, const acc_type<T>* shift,
                        acc_type<T>* mean, acc_type<T>* m2) {
  using acc_t = acc_type<T>;
  using V = AccVec<T>;
  std::fill(mean, mean + C, acc_t(0));
  std::fill(m2, m2 + C, acc_t(0));
  for_each_row<T>(C, rb, re, [&](int64_t i, int64_t c) {
    (V::loadu(mean + c) + (load_acc(x + i) - V::loadu(shift + c))).store(mean + c);
  }, [&](int64_t i, int64_t c) {
    mean[c] += static_cast<acc_t>(x[i]) - shift[c];
  });
  const acc_t count = static_cast<acc_t>(re - rb);
  for (int64_t c = 0; c < C; ++c) mean[c] /= count;
  for_each_row<T>(C, rb, re, [&](int64_t i, int64_t c) {
    const V d = (load_acc(x + i) - V::loadu(shift + c)) - V::loadu(mean + c);
    at::vec::fmadd(d, d, V::loadu(m2 + c)).store(m2 + c);
  }, [&](int64_t i, int64_t c) {
    const acc_t d = (static_cast<acc_t>(x[i]) - shift[c]) - mean[c];
    m2[c] += d * d;
  });
}

// a <- a U b for C channels; a covers na rows, b covers nb rows.
template <typename acc_t>
void merge_channels(acc_t* mean_a, acc_t* m2_a, int64_t na, const acc_t* mean_b,
                    const acc_t* m2_b, int64_t nb, int64_t C) {
  using V = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  for (; c + W <= C; c += W) {
    V ma = V::loadu(mean_a + c), qa = V::loadu(m2_a + c);
    merge(ma, qa, na, V::loadu(mean_b + c), V::loadu(m2_b + c), nb);
    ma.store(mean_a + c);
    qa.store(m2_a + c);
  }
  for (; c < C; ++c) {
    Moments<acc_t> a{mean_a[c], m2_a[c], na};
    merge(a, Moments<acc_t>{mean_b[c], m2_b[c], nb});
    mean_a[c] = a.mean;
    m2_a[c] = a.m2;
  }
}

// Per-channel moments of all rows: groups of blocks in parallel, then the groups merged in order.
template <typename T>
void rows_moments(const T* x, const Geometry& g, acc_type<T>* mean, acc_type<T>* m2) {
  using acc_t = acc_type<T>;
  const RowGrid grid(g);
  const int64_t C = g.C;
  std::vector<acc_t> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) shift[c] = channel_shift(x, g, c);
  std::vector<acc_t> partial(static_cast<size_t>(grid.groups * 2 * C));
  at::parallel_for(0, grid.groups, 1, [&](int64_t gb, int64_t ge) {
    std::vector<acc_t> scratch(static_cast<size_t>(2 * C));
    for (int64_t grp = gb; grp < ge; ++grp) {
      acc_t* gmean = partial.data() + grp * 2 * C;
      acc_t* gm2 = gmean + C;
      const int64_t r_end = grid.group_row_begin(grp + 1);
      int64_t r0 = grid.group_row_begin(grp);
      int64_t r1 = std::min(r_end, r0 + grid.block_rows);
      rows_block_moments(x, C, r0, r1, shift.data(), gmean, gm2);
      for (int64_t rows_done = r1 - r0; r1 < r_end; rows_done += r1 - r0) {
        r0 = r1;
        r1 = std::min(r_end, r0 + grid.block_rows);
        rows_block_moments(x, C, r0, r1, shift.data(), scratch.data(), scratch.data() + C);
        merge_channels(gmean, gm2, rows_done, scratch.data(), scratch.data() + C, r1 - r0, C);
      }
    }
  });
  // Merge the groups in order; threads take disjoint ranges of channels.
  const int64_t W = kW<T>;
  at::parallel_for(0, divup(C, W), std::max<int64_t>(1, cpu::kGrain / (W * grid.groups)),
                   [&](int64_t vb, int64_t ve) {
    const int64_t c0 = vb * W, c1 = std::min(C, ve * W);
    std::copy(partial.data() + c0, partial.data() + c1, mean + c0);
    std::copy(partial.data() + C + c0, partial.data() + C + c1, m2 + c0);
    int64_t rows_done = grid.group_row_begin(1);
    for (int64_t grp = 1; grp < grid.groups; ++grp) {
      const acc_t* gmean = partial.data() + grp * 2 * C;
      const int64_t n = grid.group_row_begin(grp + 1) - grid.group_row_begin(grp);
      merge_channels(mean + c0, m2 + c0, rows_done, gmean + c0, gmean + C + c0, n, c1 - c0);
      rows_done += n;
    }
    for (int64_t c = c0; c < c1; ++c) mean[c] += shift[c];
  });
}

// Per-channel sum dy and sum dy * (x - mean) of all rows, by groups merged in order.
template <typename T>
void rows_sums(const T* dy, const T* x, const Geometry& g, const acc_type<T>* mean,
               acc_type<T>* sum_dy, acc_type<T>* sum_dy_xmu) {
  using acc_t = acc_type<T>;
  using V = AccVec<T>;
  const RowGrid grid(g);
  const int64_t C = g.C;
  std::vector<acc_t> partial(static_cast<size_t>(grid.groups * 2 * C), acc_t(0));
  at::parallel_for(0, grid.groups, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t grp = gb; grp < ge; ++grp) {
      acc_t* s = partial.data() + grp * 2 * C;
      acc_t* p = s + C;
      const int64_t rb = grid.group_row_begin(grp), re = grid.group_row_begin(grp + 1);
      for_each_row<T>(C, rb, re, [&](int64_t i, int64_t c) {
        const V g0 = load_acc(dy + i);
        (V::loadu(s + c) + g0).store(s + c);
        at::vec::fmadd(g0, load_acc(x + i) - V::loadu(mean + c), V::loadu(p + c)).store(p + c);
      }, [&](int64_t i, int64_t c) {
        const acc_t g0 = static_cast<acc_t>(dy[i]);
        s[c] += g0;
        p[c] += g0 * (static_cast<acc_t>(x[i]) - mean[c]);
      });
    }
  });
  at::parallel_for(0, C, std::max<int64_t>(1, cpu::kGrain / grid.groups),
                   [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      acc_t s = 0, p = 0;
      for (int64_t grp = 0; grp < grid.groups; ++grp) {
        s += partial[grp * 2 * C + c];
        p += partial[grp * 2 * C + C + c];
      }
      sum_dy[c] = s;
      sum_dy_xmu[c] = p;
    }
  });
}

// ------------------------------------------------------------------------ the four parts

// Per-channel mean and M2 (sum of squared deviations) of x; every channel has g.count() values.
template <typename T>
void channel_moments(const T* x, const Geometry& g, acc_type<T>* mean, acc_type<T>* m2) {
  using acc_t = acc_type<T>;
  if (g.rows) {
    rows_moments(x, g, mean, m2);
    return;
  }
  const PlaneGrid grid(g);
  if (split_channels(g)) {
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Moments<acc_t> m = plane_channel_moments(x, g, grid, c);
        mean[c] = m.mean;
        m2[c] = m.m2;
      }
    });
    return;
  }
  // Few channels: spread the groups of every channel over the threads, then merge in order.
  std::vector<Moments<acc_t>> partial(static_cast<size_t>(g.C * grid.groups));
  at::parallel_for(0, g.C * grid.groups, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t c = i / grid.groups;
      partial[i] = plane_group_moments(x, g, grid, c, i % grid.groups, channel_shift(x, g, c));
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    Moments<acc_t> m;
    for (int64_t grp = 0; grp < grid.groups; ++grp) merge(m, partial[c * grid.groups + grp]);
    mean[c] = m.mean + channel_shift(x, g, c);
    m2[c] = m.m2;
  }
}

// y = (x - mean[c]) * scale[c] + shift[c].
template <typename T>
void normalise(const T* x, T* y, const Geometry& g, const acc_type<T>* mean,
               const acc_type<T>* scale, const acc_type<T>* shift) {
  using V = AccVec<T>;
  if (g.rows) {
    const int64_t C = g.C;
    const int64_t grain = std::max<int64_t>(1, cpu::kGrain / C);
    at::parallel_for(0, g.count(), grain, [&](int64_t b, int64_t e) {
      for_each_row<T>(C, b, e, [&](int64_t i, int64_t c) {
        store_acc(y + i, at::vec::fmadd(load_acc(x + i) - V::loadu(mean + c), V::loadu(scale + c),
                                        V::loadu(shift + c)));
      }, [&](int64_t i, int64_t c) {
        y[i] = static_cast<T>((static_cast<acc_type<T>>(x[i]) - mean[c]) * scale[c] + shift[c]);
      });
    });
    return;
  }
  at::parallel_for(0, g.N * g.C * g.L, cpu::kGrain, [&](int64_t b, int64_t e) {
    for_each_plane_run(g, b, e, [&](int64_t c, int64_t off, int64_t len) {
      normalise_run(x + off, y + off, len, Affine<acc_type<T>>{mean[c], scale[c], shift[c]});
    });
  });
}

// Per-channel sum dy and sum dy * (x - mean[c]).
template <typename T>
void channel_grad_sums(const T* dy, const T* x, const Geometry& g, const acc_type<T>* mean,
                       acc_type<T>* sum_dy, acc_type<T>* sum_dy_xmu) {
  using acc_t = acc_type<T>;
  if (g.rows) {
    rows_sums(dy, x, g, mean, sum_dy, sum_dy_xmu);
    return;
  }
  const PlaneGrid grid(g);
  if (split_channels(g)) {
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        std::tie(sum_dy[c], sum_dy_xmu[c]) = plane_channel_sums(dy, x, g, grid, c, mean[c]);
      }
    });
    return;
  }
  std::vector<std::pair<acc_t, acc_t>> partial(static_cast<size_t>(g.C * grid.groups));
  at::parallel_for(0, g.C * grid.groups, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t c = i / grid.groups;
      partial[i] = plane_group_sums(dy, x, g, grid, c, i % grid.groups, mean[c]);
    }
  });
  for (int64_t c = 0; c < g.C; ++c) {
    acc_t s = 0, p = 0;
    for (int64_t grp = 0; grp < grid.groups; ++grp) {
      s += partial[c * grid.groups + grp].first;
      p += partial[c * grid.groups + grp].second;
    }
    sum_dy[c] = s;
    sum_dy_xmu[c] = p;
  }
}

// dx from per-channel coefficients: training (train) or evaluation (dx = dy * a[c]) formula.
template <typename T>
void apply_grad(const T* dy, const T* x, T* dx, const Geometry& g,
                const GradCoeffs<acc_type<T>>* coeffs, bool train) {
  using acc_t = acc_type<T>;
  if (g.rows) {
    const int64_t C = g.C;
    std::vector<acc_t> m(C), mdy(C), k(C), a(C);  // structure of arrays, for vector loads
    for (int64_t c = 0; c < C; ++c) {
      m[c] = coeffs[c].mean;
      mdy[c] = coeffs[c].mean_dy;
      k[c] = coeffs[c].k;
      a[c] = coeffs[c].a;
    }
    using V = AccVec<T>;
    const int64_t grain = std::max<int64_t>(1, cpu::kGrain / C);
    at::parallel_for(0, g.count(), grain, [&](int64_t b, int64_t e) {
      if (train) {
        for_each_row<T>(C, b, e, [&](int64_t i, int64_t c) {
          const V t = at::vec::fnmadd(load_acc(x + i) - V::loadu(m.data() + c),
                                      V::loadu(k.data() + c),
                                      load_acc(dy + i) - V::loadu(mdy.data() + c));
          store_acc(dx + i, t * V::loadu(a.data() + c));
        }, [&](int64_t i, int64_t c) {
          const acc_t t = (static_cast<acc_t>(dy[i]) - mdy[c]) -
                          (static_cast<acc_t>(x[i]) - m[c]) * k[c];
          dx[i] = static_cast<T>(t * a[c]);
        });
      } else {
        for_each_row<T>(C, b, e, [&](int64_t i, int64_t c) {
          store_acc(dx + i, load_acc(dy + i) * V::loadu(a.data() + c));
        }, [&](int64_t i, int64_t c) {
          dx[i] = static_cast<T>(static_cast<acc_t>(dy[i]) * a[c]);
        });
      }
    });
    return;
  }
  at::parallel_for(0, g.N * g.C * g.L, cpu::kGrain, [&](int64_t b, int64_t e) {
    for_each_plane_run(g, b, e, [&](int64_t c, int64_t off, int64_t len) {
      if (train) {
        grad_train_run(dy + off, x + off, dx + off, len, coeffs[c]);
      } else {
        grad_eval_run(dy + off, dx + off, len, coeffs[c].a);
      }
    });
  });
}

// ---------------------------------------------------------------------------- fused passes

// Statistics, then finish(c, Moments) -> Affine for every channel, then y. With threads split
// over channels, a thread normalises each of its channels right after its statistics, while the
// channel is still in L2.
template <typename T, typename Finish>
void moments_then_normalise(const T* x, T* y, const Geometry& g, const Finish& finish) {
  using acc_t = acc_type<T>;
  if (split_channels(g)) {
    const PlaneGrid grid(g);
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Affine<acc_t> a = finish(c, plane_channel_moments(x, g, grid, c));
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t off = (n * g.C + c) * g.L;
          normalise_run(x + off, y + off, g.L, a);
        }
      }
    });
    return;
  }
  std::vector<acc_t> mean(g.C), m2(g.C), scale(g.C), shift(g.C);
  channel_moments(x, g, mean.data(), m2.data());
  for (int64_t c = 0; c < g.C; ++c) {
    const Affine<acc_t> a = finish(c, Moments<acc_t>{mean[c], m2[c], g.count()});
    mean[c] = a.mean;
    scale[c] = a.scale;
    shift[c] = a.shift;
  }
  normalise(x, y, g, mean.data(), scale.data(), shift.data());
}

// The backward pass: sums (when `reduce`; zeros otherwise), then finish(c, sum_dy, sum_dy_xmu)
// -> GradCoeffs for every channel, then dx (when dx is not null), channel by channel in cache
// when threads split the channels.
template <typename T, typename Finish>
void sums_then_grad(const T* dy, const T* x, T* dx, const Geometry& g, const acc_type<T>* mean,
                    bool reduce, bool train, const Finish& finish) {
  using acc_t = acc_type<T>;
  if (split_channels(g)) {
    const PlaneGrid grid(g);
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const auto s = reduce ? plane_channel_sums(dy, x, g, grid, c, mean[c])
                              : std::pair<acc_t, acc_t>(0, 0);
        const GradCoeffs<acc_t> k = finish(c, s.first, s.second);
        if (dx == nullptr) continue;
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t off = (n * g.C + c) * g.L;
          if (train) {
            grad_train_run(dy + off, x + off, dx + off, g.L, k);
          } else {
            grad_eval_run(dy + off, dx + off, g.L, k.a);
          }
        }
      }
    });
    return;
  }
  std::vector<acc_t> sum_dy(g.C, acc_t(0)), sum_dy_xmu(g.C, acc_t(0));
  if (reduce) channel_grad_sums(dy, x, g, mean, sum_dy.data(), sum_dy_xmu.data());
  std::vector<GradCoeffs<acc_t>> coeffs(g.C);
  for (int64_t c = 0; c < g.C; ++c) coeffs[c] = finish(c, sum_dy[c], sum_dy_xmu[c]);
  if (dx != nullptr) apply_grad(dy, x, dx, g, coeffs.data(), train);
}

}  // namespace bn_cpu
}  // namespace dlext
