// Row kernels of the CPU cross-entropy: the C classes of each (n, d) row are contiguous ((N, C)
// logits, channels_last images), so classes fill the vector lanes. (Rows of at most kCESmallC
// classes take the lane kernels in the forward: cross_entropy_cpu_lanes.h.)
//
// Forward, per row: the row's max M (one sweep), then one sweep for s = sum_c exp(x_c - M) and,
// when the loss needs them, the smoothing or probability terms, all kept relative to M:
//   S = sum_c w_c (M - x_c),  T = sum_c w_c y'_c (M - x_c),  Y = sum_c w_c y'_c
// so that lse - x_c = (M - x_c) + log s never subtracts two large numbers: logits of +-1e4 keep
// full precision, and every term is >= 0. M and log s, kept apart, are all the backward needs.
// Why it is fast: the first sweep streams the row from memory, the second finds it in L1/L2 (a
// row of 32000 floats is 125 KiB), so memory is read once; the maxima need no rescaling, which an
// online (running-max) sum would pay for in extra exps and blends; rows go W at a time so that
// one vector log serves W rows.
// Backward, per row: one sweep writing scale * (p_c * A - B_c) with p_c = exp((x_c - M) - log s),
// the target's term applied by a lane compare in the one vector that holds it; probabilities take
// one more sweep first for Y. Exps: vexp below. Accumulation is in acc_t lanes, combined in a
// fixed order, so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "common/cpu_opmath_vec.h"
#include "cross_entropy/cross_entropy_cpu_args.h"

namespace dlext {
namespace cpu {

// Rows per block of the forward's partial sums (a multiple of every lane count).
constexpr int64_t kCERowsPerBlock = 32;
// Elements per parallel task.
constexpr int64_t kCEGrain = 32768;

[[noreturn]] C10_NOINLINE inline void target_out_of_bounds(int64_t t, int64_t C) {
  TORCH_CHECK_INDEX(false, "dlext::cross_entropy: Target ", t,
                    " is out of bounds. (expected a class index in [0, ", C,
                    ") or ignore_index)");
  __builtin_unreachable();
}

inline void check_target(int64_t t, int64_t C) {
  if (C10_UNLIKELY(t < 0 || t >= C)) target_out_of_bounds(t, C);
}

template <typename Vec>
inline Vec vmax(const Vec& a, const Vec& b) {
  return at::vec::maximum(a, b);
}

// exp for the kernels. float: at::vec's exp_u20 (a degree-5 polynomial, within 20 ulp; about
// twice the throughput of SLEEF's 1-ulp expf, and exp is what these kernels spend their time
// on). Its arguments are x - max or x - lse <= 0, where 20 ulp is a relative 2.4e-6. exp_u20
// clamps its argument, so NaN comes out finite: the callers make a row's log-sum NaN when its max
// is not finite (NaN or +inf anywhere, or every logit -inf: log_softmax gives NaN there too) by
// adding max - max, and add log_sum - log_sum to each backward scale, so such rows come out NaN
// as in torch without a NaN test per element. double: SLEEF's exp.
template <typename Vec>
inline Vec vexp(const Vec& v) {
  if constexpr (std::is_same_v<typename Vec::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

template <typename acc_t>
inline acc_t hsum(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v);
}

// The last, partial vector of a row of C classes: its n = C % W lanes, and a mask with all bits
// set in those lanes (to blend or AND the others away).
template <typename Vec>
struct RowTail {
  int64_t n;
  Vec keep;
  explicit RowTail(int64_t C)
      : n(C % Vec::size()),
        keep(Vec::arange(0, 1) < Vec(static_cast<typename Vec::value_type>(C % Vec::size()))) {}
};

// max_c x_c; NaN propagates; -inf for an empty row.
template <typename scalar_t, typename Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>>
inline at::opmath_type<scalar_t> row_max(const scalar_t* x, int64_t C, const RowTail<Vec>& tail) {
  using OV = OpmathVec<scalar_t>;
  using acc_t = typename OV::acc_t;
  constexpr int64_t W = OV::kSize;
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  Vec m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t c = 0;
  for (; c + 4 * W <= C; c += 4 * W) {
    m0 = vmax(m0, OV::load(x + c));
    m1 = vmax(m1, OV::load(x + c + W));
    m2 = vmax(m2, OV::load(x + c + 2 * W));
    m3 = vmax(m3, OV::load(x + c + 3 * W));
  }
  for (; c + W <= C; c += W) m0 = vmax(m0, OV::load(x + c));
  if (tail.n) m1 = vmax(m1, Vec::blendv(ninf, OV::load(x + c, tail.n), tail.keep));
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return vmax(a, b); },
                                        vmax(vmax(m0, m1), vmax(m2, m3)));
}

// Sums of one row relative to its max M: s = sum exp(x - M); with kSmooth also
// S = sum w_c (M - x_c) (w_c = 1 without weights).
template <typename scalar_t, bool kSmooth, bool kWeighted, typename Vec>
inline void row_sums_index(const scalar_t* x, const at::opmath_type<scalar_t>* w, int64_t C,
                           const RowTail<Vec>& tail, at::opmath_type<scalar_t> M,
                           at::opmath_type<scalar_t>& s_out, at::opmath_type<scalar_t>& S_out) {
  using OV = OpmathVec<scalar_t>;
  constexpr int64_t W = OV::kSize;
  const Vec vM(M), zero(0);
  Vec s0 = zero, s1 = zero, S0 = zero, S1 = zero;
  auto step = [&](const Vec& v, int64_t c, Vec& s, Vec& S, const Vec& keep) {
    s = s + (vexp(v - vM) & keep);
    if constexpr (kSmooth) {
      if constexpr (kWeighted) {
        S = at::vec::fmadd(Vec::loadu(w + c, std::min(W, C - c)), vM - v, S);
      } else {
        S = S + ((vM - v) & keep);
      }
    }
  };
  const Vec all = Vec(0) == Vec(0);
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W) {
    step(OV::load(x + c), c, s0, S0, all);
    step(OV::load(x + c + W), c + W, s1, S1, all);
  }
  for (; c + W <= C; c += W) step(OV::load(x + c), c, s0, S0, all);
  if (tail.n) step(OV::load(x + c, tail.n), c, s1, S1, tail.keep);
  s_out = hsum(s0 + s1);
  S_out = kSmooth ? hsum(S0 + S1) : 0;
}

// Sums of one row relative to its max M for probability targets, y'_c = a * y_c + b:
// s = sum exp(x - M), T = sum w_c y'_c (M - x_c), Y = sum w_c y'_c.
template <typename scalar_t, bool kWeighted, typename Vec>
inline void row_sums_prob(const scalar_t* x, const scalar_t* y,
                          const at::opmath_type<scalar_t>* w, int64_t C, const RowTail<Vec>& tail,
                          at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b,
                          at::opmath_type<scalar_t> M, at::opmath_type<scalar_t>& s_out,
                          at::opmath_type<scalar_t>& T_out, at::opmath_type<scalar_t>& Y_out) {
  using OV = OpmathVec<scalar_t>;
  constexpr int64_t W = OV::kSize;
  const Vec vM(M), va(a), vb(b), zero(0);
  Vec s = zero, T = zero, Y = zero;
  auto step = [&](int64_t c, int64_t cnt, const Vec& keep) {
    const Vec v = OV::load(x + c, cnt);
    Vec wy = at::vec::fmadd(va, OV::load(y + c, cnt), vb) & keep;
    if constexpr (kWeighted) wy = wy * Vec::loadu(w + c, cnt);
    s = s + (vexp(v - vM) & keep);
    T = at::vec::fmadd(wy, vM - v, T);
    Y = Y + wy;
  };
  const Vec all = Vec(0) == Vec(0);
  int64_t c = 0;
  for (; c + W <= C; c += W) step(c, W, all);
  if (tail.n) step(c, tail.n, tail.keep);
  s_out = hsum(s);
  T_out = hsum(T);
  Y_out = hsum(Y);
}

// Walks rows r0, r0 + 1, ... as (n, d) without a division per row.
struct RowCursor {
  int64_t n, d, D;
  RowCursor(int64_t r0, int64_t D_) : n(r0 / D_), d(r0 - (r0 / D_) * D_), D(D_) {}
  void next() {
    if (++d == D) {
      d = 0;
      ++n;
    }
  }
};

// Forward over the rows [r0, r1) (r = n * D + d) of block `block`, class-index targets: lse per
// row, the loss per row (reduction 'none') and the block's sums. Rows go W at a time so that
// one vector log serves W rows.
template <typename scalar_t, bool kSmooth, bool kWeighted>
void rows_forward_index(const CEArgs<scalar_t>& A, const CEForwardOut<scalar_t>& out,
                        int64_t block, int64_t r0, int64_t r1) {
  using Vec = typename OpmathVec<scalar_t>::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec::size();
  const RowTail<Vec> tail(A.C);
  acc_t loss_sum = 0, weight_sum = 0;
  int64_t count = 0;
  RowCursor cur(r0, A.D);
  alignas(64) acc_t M[W], s[W], S[W], xt[W], log_s[W];
  int64_t t[W];
  for (int64_t r = r0; r < r1; r += W) {
    const int64_t m = std::min(W, r1 - r);
    for (int64_t i = 0; i < m; ++i, cur.next()) {
      const scalar_t* x = A.row_x(cur.n, cur.d);
      t[i] = A.target(cur.n, cur.d);
      if (t[i] != A.ignore_index) {
        check_target(t[i], A.C);
        xt[i] = static_cast<acc_t>(x[t[i]]);
      }
      M[i] = row_max(x, A.C, tail);
      row_sums_index<scalar_t, kSmooth, kWeighted>(x, A.w, A.C, tail, M[i], s[i], S[i]);
    }
    for (int64_t i = m; i < W; ++i) s[i] = M[i] = 1;
    const Vec vM = Vec::loadu(M);
    (Vec::loadu(s).log() + (vM - vM)).store(log_s);  // NaN where the max is not finite
    for (int64_t i = 0; i < m; ++i) {
      A.lse_max[r + i] = M[i];
      A.lse_log_sum[r + i] = log_s[i];
      acc_t loss = 0;
      if (t[i] != A.ignore_index) {
        const acc_t wt = kWeighted ? A.w[t[i]] : acc_t(1);
        loss = wt * ((M[i] - xt[i]) + log_s[i]);
        if constexpr (kSmooth) loss = A.a * loss + A.b * (S[i] + A.w_sum * log_s[i]);
        weight_sum += wt;
        ++count;
      }
      if (out.loss) out.loss[r + i] = static_cast<scalar_t>(loss);
      loss_sum += loss;
    }
  }
  out.block_loss[block] = loss_sum;
  out.block_weight[block] = weight_sum;
  out.block_count[block] = count;
}

// Forward over rows [r0, r1) with probability targets (y walked with x's row strides).
template <typename scalar_t, bool kWeighted>
void rows_forward_prob(const CEArgs<scalar_t>& A, const CEForwardOut<scalar_t>& out,
                       int64_t block, int64_t r0, int64_t r1) {
  using Vec = typename OpmathVec<scalar_t>::Vec;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec::size();
  const RowTail<Vec> tail(A.C);
  acc_t loss_sum = 0;
  RowCursor cur(r0, A.D);
  alignas(64) acc_t M[W], s[W], T[W], Y[W], log_s[W];
  for (int64_t r = r0; r < r1; r += W) {
    const int64_t m = std::min(W, r1 - r);
    for (int64_t i = 0; i < m; ++i, cur.next()) {
      const scalar_t* x = A.row_x(cur.n, cur.d);
      M[i] = row_max(x, A.C, tail);
      row_sums_prob<scalar_t, kWeighted>(x, A.row_y(cur.n, cur.d), A.w, A.C, tail, A.a, A.b,
                                         M[i], s[i], T[i], Y[i]);
    }
    for (int64_t i = m; i < W; ++i) s[i] = M[i] = 1;
    const Vec vM = Vec::loadu(M);
    (Vec::loadu(s).log() + (vM - vM)).store(log_s);  // NaN where the max is not finite
    for (int64_t i = 0; i < m; ++i) {
      A.lse_max[r + i] = M[i];
      A.lse_log_sum[r + i] = log_s[i];
      const acc_t loss = T[i] + Y[i] * log_s[i];
      if (out.loss) out.loss[r + i] = static_cast<scalar_t>(loss);
      loss_sum += loss;
    }
  }
  out.block_loss[block] = loss_sum;
  out.block_weight[block] = 0;
  out.block_count[block] = r1 - r0;
}

// Backward of one row with class-index target: g_c = p_c * sA - sB * w_c, less sT on the
// target's lane (one vector holds it). Ignored rows get p_c * 0 (0, or NaN where the row is not
// finite, as torch's log_softmax backward gives).
template <typename scalar_t, bool kSmooth, bool kWeighted>
void row_backward_index(const CEArgs<scalar_t>& A, const CEBackwardArgs<scalar_t>& B,
                        const RowTail<typename OpmathVec<scalar_t>::Vec>& tail, int64_t n,
                        int64_t d) {
  using OV = OpmathVec<scalar_t>;
  using Vec = typename OV::Vec;
  using acc_t = typename OV::acc_t;
  constexpr int64_t W = OV::kSize;
  const int64_t C = A.C;
  const scalar_t* x = A.row_x(n, d);
  scalar_t* g = B.gx + n * B.g_sn + d * B.g_sd;
  const acc_t log_sum = A.lse_log_sum[n * A.D + d];
  const Vec M(A.lse_max[n * A.D + d]), L(log_sum);
  const int64_t t = A.target(n, d);
  acc_t sA = 0, sB = 0, sT = 0;
  int64_t t_vec = -1;  // the first class of the vector holding the target
  if (t != A.ignore_index) {
    check_target(t, C);
    const acc_t s = B.row_scale(n, d);
    const acc_t wt = kWeighted ? A.w[t] : acc_t(1);
    sA = s * (kSmooth ? A.a * wt + A.b * A.w_sum : wt);
    sB = kSmooth ? s * A.b : acc_t(0);
    sT = s * (kSmooth ? A.a : acc_t(1)) * wt;
    t_vec = t - t % W;
  }
  const Vec vsA(sA + (log_sum - log_sum)), vsB(sB);  // NaN for a row not all finite, see vexp
  auto body = [&](int64_t c, int64_t cnt) {
    Vec gc = vexp((OV::load(x + c, cnt) - M) - L) * vsA;
    if constexpr (kSmooth) gc = gc - (kWeighted ? vsB * Vec::loadu(A.w + c, cnt) : vsB);
    if (c == t_vec) {
      gc = gc - (Vec(sT) & (Vec::arange(0, 1) == Vec(static_cast<acc_t>(t - c))));
    }
    OV::store(g + c, gc, cnt);
  };
  int64_t c = 0;
  for (; c + W <= C; c += W) body(c, W);
  if (tail.n) body(c, tail.n);
}

// Backward of one row with probability targets: g_c = p_c * s * Y - s * w_c y'_c, and
// grad_target_c = s * a * w_c * (lse - x_c).
template <typename scalar_t, bool kWeighted>
void row_backward_prob(const CEArgs<scalar_t>& A, const CEBackwardArgs<scalar_t>& B,
                       const RowTail<typename OpmathVec<scalar_t>::Vec>& tail, int64_t n,
                       int64_t d) {
  using OV = OpmathVec<scalar_t>;
  using Vec = typename OV::Vec;
  using acc_t = typename OV::acc_t;
  constexpr int64_t W = OV::kSize;
  const int64_t C = A.C;
  const scalar_t* x = A.row_x(n, d);
  const scalar_t* y = A.row_y(n, d);
  const int64_t goff = n * B.g_sn + d * B.g_sd;
  const acc_t s = B.row_scale(n, d), log_sum = A.lse_log_sum[n * A.D + d];
  const Vec va(A.a), vb(A.b), vs(s), M(A.lse_max[n * A.D + d]), L(log_sum);
  auto wy_of = [&](int64_t c, int64_t cnt) {
    const Vec yp = at::vec::fmadd(va, OV::load(y + c, cnt), vb);
    return kWeighted ? yp * Vec::loadu(A.w + c, cnt) : yp;
  };
  Vec sY(0);
  if (B.gx) {
    Vec Y(0);
    int64_t c = 0;
    for (; c + W <= C; c += W) Y = Y + wy_of(c, W);
    if (tail.n) Y = Y + (wy_of(c, tail.n) & tail.keep);
    sY = Vec(s * hsum(Y) + (log_sum - log_sum));  // NaN for a row not all finite, see vexp
  }
  const Vec sa = vs * va;
  auto body = [&](int64_t c, int64_t cnt) {
    const Vec v = OV::load(x + c, cnt);
    if (B.gx) OV::store(B.gx + goff + c, vexp((v - M) - L) * sY - vs * wy_of(c, cnt), cnt);
    if (B.gy) {
      const Vec f = kWeighted ? sa * Vec::loadu(A.w + c, cnt) : sa;
      OV::store(B.gy + goff + c, f * ((M - v) + L), cnt);
    }
  };
  int64_t c = 0;
  for (; c + W <= C; c += W) body(c, W);
  if (tail.n) body(c, tail.n);
}

}  // namespace cpu
}  // namespace dlext
