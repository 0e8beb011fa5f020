// Lane kernels of the CPU cross-entropy: each vector lane owns one row (n, d), and a group of W
// rows (8 floats, 4 doubles) walks its C classes as C vectors, one per class. Two sources feed
// the groups:
//  - planes: inputs whose positions are contiguous (NCHW images, (N, C, L) sequences); class c
//    of a group is one vector load at x + n * sN + c * sC + d;
//  - small rows (forward only): rows of at most kCESmallC contiguous classes ((N, 10) logits).
//    W rows are transposed into a C x W scratch first (8 x 8 register transposes for evenly
//    spaced float rows, element moves otherwise), which buys W rows' max, sums and log as
//    vertical vector ops instead of a chain of horizontal reductions per row, the latency that
//    bounds the row kernels when C is small. (The backward has no reductions; such rows go
//    through cross_entropy_cpu_flat.h instead.)
// Per group the math is the row kernels' (cross_entropy_cpu_rows.h): the per-lane max M over the
// classes, then s = sum exp(x - M) and the smoothing or probability terms relative to M. The
// target's logit is picked per lane in scalar after its range check; in the backward a lane
// compare against the class index applies the target's term inside the vector loop.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cpu_opmath_vec.h"
#include "cross_entropy/cross_entropy_cpu_args.h"
#include "cross_entropy/cross_entropy_cpu_rows.h"

namespace dlext {
namespace cpu {

// Positions per forward block of the plane kernels (whole groups).
constexpr int64_t kCEPlaneBlock = 64;
// Rows of at most this many classes take the small-row lane kernels.
constexpr int64_t kCESmallC = 32;

// Integer lanes matching the acc_t lanes (int32 x 8 for float, int64 x 4 for double), for the
// per-lane class compare.
template <typename acc_t>
using CEIndexVec =
    at::vec::Vectorized<std::conditional_t<std::is_same_v<acc_t, double>, int64_t, int32_t>>;

// Per-lane class-index data of a group: the target (-1 when ignored or unused), its weight and
// logit (0 then), and 1 / 0 for counted / not.
template <typename scalar_t>
struct CELanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using IVec = CEIndexVec<acc_t>;
  using index_t = typename IVec::value_type;
  static constexpr int64_t W = Vec::size();
  alignas(64) index_t t[W];
  alignas(64) acc_t wt[W];
  alignas(64) acc_t xt[W];
  alignas(64) acc_t valid[W];

  CELanes() {
    for (int64_t i = 0; i < W; ++i) {
      t[i] = -1;
      wt[i] = xt[i] = valid[i] = 0;
    }
  }

  // Lane i: a row with class `target` whose logits are xrow[c * x_sc].
  void set(int64_t i, const CEArgs<scalar_t>& A, int64_t target, const scalar_t* xrow,
           int64_t x_sc) {
    if (target == A.ignore_index) return;
    check_target(target, A.C);
    t[i] = static_cast<index_t>(target);
    wt[i] = A.w ? A.w[target] : acc_t(1);
    xt[i] = static_cast<acc_t>(xrow[target * x_sc]);
    valid[i] = 1;
  }
};

// Class c of a group as a vector: from contiguous positions, or from a C x W scratch.
template <typename scalar_t>
struct PlaneSource {
  const scalar_t* p;
  int64_t stride, cnt;
  auto operator()(int64_t c) const { return OpmathVec<scalar_t>::load(p + c * stride, cnt); }
};

template <typename acc_t>
struct ScratchSource {
  const acc_t* p;
  auto operator()(int64_t c) const {
    using Vec = at::vec::Vectorized<acc_t>;
    return Vec::loadu(p + c * Vec::size());
  }
};

// Copies the classes of rows [r, r + m) into scratch[c * W + i] as acc_t (lanes past m: 0), and
// returns the row pointers through `rows`. Eight float rows equally spaced in memory (dense
// (N, C) logits) go through in-register 8 x 8 transposes, the rest element by element.
template <typename scalar_t>
void transpose_rows(const scalar_t* base, int64_t sn, int64_t sd, RowCursor cur, int64_t m,
                    int64_t C, at::opmath_type<scalar_t>* scratch, const scalar_t** rows) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  for (int64_t i = 0; i < m; ++i, cur.next()) rows[i] = base + cur.n * sn + cur.d * sd;
  int64_t c0 = 0;
  if constexpr (std::is_same_v<scalar_t, float> && W == 8) {
    const int64_t ld = m == W ? rows[1] - rows[0] : 0;
    bool even = ld > 0;
    for (int64_t i = 2; even && i < W; ++i) even = rows[i] - rows[0] == i * ld;
    for (; even && c0 + 8 <= C; c0 += 8) {
      at::vec::transpose_mxn<float, 8, 8>(rows[0] + c0, ld, scratch + c0 * W, W);
    }
  }
  for (int64_t i = 0; i < W; ++i) {
    for (int64_t c = c0; c < C; ++c) {
      scratch[c * W + i] = i < m ? static_cast<acc_t>(rows[i][c]) : acc_t(0);
    }
  }
}

// Running sums of a forward block: per-lane loss and weight, and the count of counted rows.
template <typename acc_t>
struct LaneSums {
  at::vec::Vectorized<acc_t> loss{0}, weight{0};
  int64_t count = 0;
};

// Forward of one group with class-index targets: writes the lse parts and (reduction 'none') the
// loss of its cnt rows at offset `off` of the (N, D) outputs, and adds to the block's sums.
template <typename scalar_t, bool kSmooth, bool kWeighted, typename Src>
void group_forward_index(const CEArgs<scalar_t>& A, const CEForwardOut<scalar_t>& out,
                         const Src& xs, const CELanes<scalar_t>& L, int64_t off, int64_t cnt,
                         LaneSums<at::opmath_type<scalar_t>>& sums) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec zero(0);
  Vec M0(-std::numeric_limits<at::opmath_type<scalar_t>>::infinity()), M1 = M0;
  int64_t c = 0;
  for (; c + 2 <= A.C; c += 2) {
    M0 = vmax(M0, xs(c));
    M1 = vmax(M1, xs(c + 1));
  }
  if (c < A.C) M0 = vmax(M0, xs(c));
  const Vec M = vmax(M0, M1);
  Vec s = zero, S = zero;
  for (c = 0; c < A.C; ++c) {
    const Vec v = xs(c);
    s = s + vexp(v - M);
    if constexpr (kSmooth) S = kWeighted ? at::vec::fmadd(Vec(A.w[c]), M - v, S) : S + (M - v);
  }
  const Vec log_s = s.log() + (M - M);  // NaN for a row that is not all finite, see vexp
  M.store(A.lse_max + off, cnt);
  log_s.store(A.lse_log_sum + off, cnt);
  const Vec valid = Vec::loadu(L.valid), wt = Vec::loadu(L.wt);
  Vec loss = wt * ((M - Vec::loadu(L.xt)) + log_s);
  if constexpr (kSmooth) {
    loss = Vec(A.a) * loss + Vec(A.b) * at::vec::fmadd(Vec(A.w_sum), log_s, S);
  }
  loss = Vec::blendv(zero, loss, valid != zero);
  if (out.loss) OpmathVec<scalar_t>::store(out.loss + off, loss, cnt);
  sums.loss = sums.loss + loss;
  sums.weight = sums.weight + wt;
  for (int64_t i = 0; i < cnt; ++i) sums.count += L.valid[i] != 0;
}

// Forward of one group with probability targets, y'_c = a * y_c + b: loss = T + Y log s with
// T = sum w_c y'_c (M - x_c), Y = sum w_c y'_c.
template <typename scalar_t, bool kWeighted, typename Src>
void group_forward_prob(const CEArgs<scalar_t>& A, const CEForwardOut<scalar_t>& out,
                        const Src& xs, const Src& ys, int64_t off, int64_t cnt,
                        LaneSums<at::opmath_type<scalar_t>>& sums) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec zero(0), va(A.a), vb(A.b);
  Vec M(-std::numeric_limits<at::opmath_type<scalar_t>>::infinity());
  for (int64_t c = 0; c < A.C; ++c) M = vmax(M, xs(c));
  Vec s = zero, T = zero, Y = zero;
  for (int64_t c = 0; c < A.C; ++c) {
    const Vec v = xs(c);
    Vec wy = at::vec::fmadd(va, ys(c), vb);
    if constexpr (kWeighted) wy = wy * Vec(A.w[c]);
    s = s + vexp(v - M);
    T = at::vec::fmadd(wy, M - v, T);
    Y = Y + wy;
  }
  const Vec log_s = s.log() + (M - M);  // NaN for a row that is not all finite, see vexp
  M.store(A.lse_max + off, cnt);
  log_s.store(A.lse_log_sum + off, cnt);
  const Vec loss = at::vec::fmadd(Y, log_s, T);
  if (out.loss) OpmathVec<scalar_t>::store(out.loss + off, loss, cnt);
  sums.loss = sums.loss + Vec::set(zero, loss, cnt);
  sums.count += cnt;
}

template <typename acc_t>
void finish_block(const LaneSums<acc_t>& sums, acc_t* block_loss, acc_t* block_weight,
                  int64_t* block_count) {
  *block_loss = hsum(sums.loss);
  *block_weight = hsum(sums.weight);
  *block_count = sums.count;
}

// Forward over the positions [d0, d1) of batch n (block `block`), planes layout.
template <typename scalar_t, bool kProb, bool kSmooth, bool kWeighted>
void planes_forward(const CEArgs<scalar_t>& A, const CEForwardOut<scalar_t>& out, int64_t block,
                    int64_t n, int64_t d0, int64_t d1) {
  constexpr int64_t W = at::vec::Vectorized<at::opmath_type<scalar_t>>::size();
  LaneSums<at::opmath_type<scalar_t>> sums;
  for (int64_t d = d0; d < d1; d += W) {
    const int64_t cnt = std::min(W, d1 - d);
    const PlaneSource<scalar_t> xs{A.x + n * A.x_sn + d, A.x_sc, cnt};
    if constexpr (kProb) {
      const PlaneSource<scalar_t> ys{A.y + n * A.y_sn + d, A.y_sc, cnt};
      group_forward_prob<scalar_t, kWeighted>(A, out, xs, ys, n * A.D + d, cnt, sums);
    } else {
      CELanes<scalar_t> L;
      for (int64_t i = 0; i < cnt; ++i) {
        L.set(i, A, A.target(n, d + i), A.x + n * A.x_sn + d + i, A.x_sc);
      }
      group_forward_index<scalar_t, kSmooth, kWeighted>(A, out, xs, L, n * A.D + d, cnt, sums);
    }
  }
  finish_block(sums, out.block_loss + block, out.block_weight + block, out.block_count + block);
}

// Forward over the rows [r0, r1) (block `block`) of at most kCESmallC classes each.
template <typename scalar_t, bool kProb, bool kSmooth, bool kWeighted>
void small_rows_forward(const CEArgs<scalar_t>& A, const CEForwardOut<scalar_t>& out,
                        int64_t block, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  alignas(64) acc_t xbuf[kCESmallC * W];
  alignas(64) acc_t ybuf[kProb ? kCESmallC * W : 1];
  const scalar_t* rows[W];
  LaneSums<acc_t> sums;
  RowCursor cur(r0, A.D);
  for (int64_t r = r0; r < r1; r += W) {
    const int64_t m = std::min(W, r1 - r);
    transpose_rows(A.x, A.x_sn, A.x_sd, cur, m, A.C, xbuf, rows);
    const ScratchSource<acc_t> xs{xbuf};
    if constexpr (kProb) {
      const scalar_t* yrows[W];
      transpose_rows(A.y, A.y_sn, A.y_sd, cur, m, A.C, ybuf, yrows);
      group_forward_prob<scalar_t, kWeighted>(A, out, xs, ScratchSource<acc_t>{ybuf}, r, m, sums);
      for (int64_t i = 0; i < m; ++i) cur.next();
    } else {
      CELanes<scalar_t> L;
      for (int64_t i = 0; i < m; ++i, cur.next()) L.set(i, A, A.target(cur.n, cur.d), rows[i], 1);
      group_forward_index<scalar_t, kSmooth, kWeighted>(A, out, xs, L, r, m, sums);
    }
  }
  finish_block(sums, out.block_loss + block, out.block_weight + block, out.block_count + block);
}

// Backward of one group with class-index targets: g_c = p_c * sA - sB * w_c, less sT on the
// lanes whose target is c; ignored lanes get p_c * 0. `s` holds the lanes' scales, M and
// log_sum their lse parts.
template <typename scalar_t, bool kSmooth, bool kWeighted, typename Src, typename Store>
void group_backward_index(const CEArgs<scalar_t>& A, const CELanes<scalar_t>& L,
                          at::vec::Vectorized<at::opmath_type<scalar_t>> s,
                          at::vec::Vectorized<at::opmath_type<scalar_t>> M,
                          at::vec::Vectorized<at::opmath_type<scalar_t>> log_sum, const Src& xs,
                          const Store& store) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using IVec = CEIndexVec<acc_t>;
  const Vec zero(0), valid = Vec::loadu(L.valid), wt = Vec::loadu(L.wt);
  s = Vec::blendv(zero, s, valid != zero);
  // + (log_sum - log_sum): NaN on the lanes whose row is not all finite, see vexp.
  const Vec sA = (kSmooth ? s * at::vec::fmadd(Vec(A.a), wt, Vec(A.b * A.w_sum)) : s * wt) +
                 (log_sum - log_sum);
  const Vec sB = s * Vec(A.b);
  const Vec sT = kSmooth ? s * Vec(A.a) * wt : s * wt;
  const IVec t = IVec::loadu(L.t);
  for (int64_t c = 0; c < A.C; ++c) {
    Vec g = vexp((xs(c) - M) - log_sum) * sA;
    if constexpr (kSmooth) g = g - (kWeighted ? sB * Vec(A.w[c]) : sB);
    const Vec is_t = at::vec::cast<acc_t>(t == IVec(static_cast<typename IVec::value_type>(c)));
    store(c, g - (sT & is_t));
  }
}

// Backward of one group with probability targets: g_c = p_c * s * Y - s * w_c y'_c and
// grad_target_c = s * a * w_c * (lse - x_c); store_x / store_y take (c, vector).
template <typename scalar_t, bool kWeighted, typename Src, typename StoreX, typename StoreY>
void group_backward_prob(const CEArgs<scalar_t>& A,
                         at::vec::Vectorized<at::opmath_type<scalar_t>> s,
                         at::vec::Vectorized<at::opmath_type<scalar_t>> M,
                         at::vec::Vectorized<at::opmath_type<scalar_t>> log_sum, const Src& xs,
                         const Src& ys, bool want_x, bool want_y, const StoreX& store_x,
                         const StoreY& store_y) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const Vec va(A.a), vb(A.b);
  auto wy_of = [&](int64_t c) {
    const Vec yp = at::vec::fmadd(va, ys(c), vb);
    return kWeighted ? yp * Vec(A.w[c]) : yp;
  };
  Vec sY(0);
  if (want_x) {
    for (int64_t c = 0; c < A.C; ++c) sY = sY + wy_of(c);
    sY = sY * s + (log_sum - log_sum);  // NaN on the lanes whose row is not all finite, see vexp
  }
  const Vec sa = s * va;
  for (int64_t c = 0; c < A.C; ++c) {
    const Vec v = xs(c);
    if (want_x) store_x(c, vexp((v - M) - log_sum) * sY - s * wy_of(c));
    if (want_y) store_y(c, (kWeighted ? sa * Vec(A.w[c]) : sa) * ((M - v) + log_sum));
  }
}

// Backward of the group of positions [d, d + cnt) of batch n, planes layout.
template <typename scalar_t, bool kProb, bool kSmooth, bool kWeighted>
void planes_backward(const CEArgs<scalar_t>& A, const CEBackwardArgs<scalar_t>& B, int64_t n,
                     int64_t d, int64_t cnt) {
  using acc_t = at::opmath_type<scalar_t>;
  using OV = OpmathVec<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  alignas(64) acc_t scale[Vec::size()] = {};
  for (int64_t i = 0; i < cnt; ++i) scale[i] = B.row_scale(n, d + i);
  const Vec s = Vec::loadu(scale);
  const Vec M = Vec::loadu(A.lse_max + n * A.D + d, cnt);
  const Vec log_sum = Vec::loadu(A.lse_log_sum + n * A.D + d, cnt);
  const PlaneSource<scalar_t> xs{A.x + n * A.x_sn + d, A.x_sc, cnt};
  const int64_t goff = n * B.g_sn + d;
  if constexpr (kProb) {
    const PlaneSource<scalar_t> ys{A.y + n * A.y_sn + d, A.y_sc, cnt};
    group_backward_prob<scalar_t, kWeighted>(
        A, s, M, log_sum, xs, ys, B.gx != nullptr, B.gy != nullptr,
        [&](int64_t c, const Vec& v) { OV::store(B.gx + goff + c * B.g_sc, v, cnt); },
        [&](int64_t c, const Vec& v) { OV::store(B.gy + goff + c * B.g_sc, v, cnt); });
  } else {
    CELanes<scalar_t> L;
    for (int64_t i = 0; i < cnt; ++i) {
      L.set(i, A, A.target(n, d + i), A.x + n * A.x_sn + d + i, A.x_sc);
    }
    group_backward_index<scalar_t, kSmooth, kWeighted>(
        A, L, s, M, log_sum, xs,
        [&](int64_t c, const Vec& v) { OV::store(B.gx + goff + c * B.g_sc, v, cnt); });
  }
}

}  // namespace cpu
}  // namespace dlext
