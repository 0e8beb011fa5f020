// Building blocks of the cross-entropy CUDA kernels (cross_entropy_cuda_forward.cu, _backward.cu):
// what a kernel reads, how a team of threads walks one row of C classes, the online log-sum-exp
// state and its merge, and the launch plans. Formulas: cross_entropy_common.h.
//
// Rows. Row r = n * D + d of the (N, C, D) view holds the classes x[n * sN + c * sC + d * sD].
// A team of G threads owns a row: G = 8 or 32 lanes of a warp for rows of few classes (several
// rows per block), the whole block for long rows (optionally split over a few blocks, merged by a
// second stage in a fixed order), or G = 1 for the "lanes" walk: one thread per row, neighbouring
// threads on neighbouring rows, which is coalesced where rows, not classes, are adjacent in memory
// ((N, C, H, W) images, transposed logits).
// Values move as packs of V (16 bytes: 4 floats, 8 halves, 2 doubles) where classes are
// contiguous in every tensor a pass touches and the rows of those tensors start at the same
// offset modulo 16 bytes: each row is then cut into a head of h < V classes (up to the first
// 16-byte boundary), P whole packs and a tail, the head and tail walked one class at a time. Any
// storage offset or odd C takes packs that way; otherwise V = 1, element by element with strides.
//
// Online log-sum-exp. A thread keeps (m, s): the largest logit it saw and sum exp(x - m); a batch
// of kUnroll packs updates m once (rescaling s by exp(m_old - m_new)) and then adds its exps, so
// the logits are read once. States merge as (max m, s_a exp(m_a - m) + s_b exp(m_b - m)), in lane
// order (warp trees, then warps in order): deterministic. NaN anywhere makes m NaN; +inf makes s
// NaN; a row of -inf gives s = 0; log s + (m - m) is then NaN for every row whose max is not
// finite, as torch's log_softmax and the CPU kernels give. The smoothing and probability sums are
// taken relative to a fixed reference, the row's first logit (0 if not finite), and moved to the
// row's max at the end: S = sum w_c (ref - x_c) + (M - ref) sum w_c, so no state rescales them.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cuda_launch.cuh"
#include "common/cuda_reduce.cuh"
#include "cross_entropy/cross_entropy_cuda.h"

namespace dlext {
namespace ce_cuda {

template <typename T>
using acc_type = at::opmath_type<T>;

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kUnroll = 4;     // packs in flight per thread

// ---------------------------------------------------------------------------------- scalar math

// exp of arguments <= 0 (x - max, x - lse): float takes the fast hardware exp2 (ex2.approx, a
// relative error near 2^-22 plus the rounding of x * log2(e), 1e-6 at |x| = 20 where exp is
// 2e-9); double the full-precision exp.
__device__ __forceinline__ float ce_exp(float v) { return __expf(v); }
__device__ __forceinline__ double ce_exp(double v) { return ::exp(v); }
__device__ __forceinline__ float ce_log(float v) { return ::logf(v); }
__device__ __forceinline__ double ce_log(double v) { return ::log(v); }

// max that propagates NaN from either side.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// ------------------------------------------------------------------------------ merged values

// Online log-sum-exp of part of a row, with the smoothing / probability sums relative to the
// row's reference: class indices A = sum w_c (ref - x_c); probabilities A = sum w_c y'_c
// (ref - x_c), B = sum w_c y'_c (y'_c = a y_c + b).
template <typename acc_t>
struct LseState {
  acc_t m, s, A, B;
};

template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> lse_empty() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t from, acc_t to) {
  return from == to ? acc_t(1) : ce_exp(from - to);
}

template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> merge(const LseState<acc_t>& a,
                                                 const LseState<acc_t>& b) {
  const acc_t m = nan_max(a.m, b.m);
  return {m, a.s * rescale(a.m, m) + b.s * rescale(b.m, m), a.A + b.A, a.B + b.B};
}

template <typename acc_t>
__device__ __forceinline__ LseState<acc_t> shfl_down(const LseState<acc_t>& v, int delta) {
  return {cuda::shfl_down(v.m, delta), cuda::shfl_down(v.s, delta), cuda::shfl_down(v.A, delta),
          cuda::shfl_down(v.B, delta)};
}

// A block's share of the reduced loss: the sum of its rows' losses, of the weights w[t] of its
// counted rows, and their number (exact in int64: the unweighted mean's denominator).
template <typename acc_t>
struct Partial {
  acc_t loss, weight;
  int64_t count;
};

template <typename acc_t>
__device__ __forceinline__ Partial<acc_t> merge(const Partial<acc_t>& a, const Partial<acc_t>& b) {
  return {a.loss + b.loss, a.weight + b.weight, a.count + b.count};
}

template <typename acc_t>
__device__ __forceinline__ Partial<acc_t> shfl_down(const Partial<acc_t>& v, int delta) {
  return {cuda::shfl_down(v.loss, delta), cuda::shfl_down(v.weight, delta),
          cuda::shfl_down_i64(v.count, delta)};
}

template <typename acc_t>
struct Sum {
  acc_t v;
};

template <typename acc_t>
__device__ __forceinline__ Sum<acc_t> merge(const Sum<acc_t>& a, const Sum<acc_t>& b) {
  return {a.v + b.v};
}

template <typename acc_t>
__device__ __forceinline__ Sum<acc_t> shfl_down(const Sum<acc_t>& v, int delta) {
  return {cuda::shfl_down(v.v, delta)};
}

// The merge of the G lanes of each aligned group of a warp, in the group's first lane (a tree,
// as cuda::warp_reduce). Every lane of the warp must call it.
template <int G, typename V>
__device__ __forceinline__ V group_reduce(V v) {
#pragma unroll
  for (int delta = G / 2; delta > 0; delta /= 2) v = merge(v, shfl_down(v, delta));
  return v;
}

// The sum of the G lanes of each aligned group, in every lane of the group: a butterfly, whose
// additions pair the same two values in both lanes, so every lane holds the same bits.
template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_allsum(acc_t v) {
#pragma unroll
  for (int mask = G / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

// ------------------------------------------------------------------------------- arguments

// What the kernels read: pointers and element strides of the (N, C, D) views.
template <typename T>
struct Args {
  using acc_t = acc_type<T>;
  int64_t N, C, D;
  const T* x;
  int64_t x_sn, x_sc, x_sd;
  const int64_t* t;  // class indices (N, D), or nullptr
  int64_t t_sn, t_sd;
  const T* y;  // probabilities (N, C, D), or nullptr
  int64_t y_sn, y_sc, y_sd;
  const acc_t* w;      // C contiguous class weights, or nullptr
  const acc_t* w_sum;  // device scalar sum of w where the smoothing needs it, else nullptr
  bool smooth;         // label smoothing of class indices
  acc_t a, b;
  int64_t ignore_index;
  int64_t* bad;  // first row with an out-of-range target (see cross_entropy_cuda.h), or nullptr
  // The saved log-sum-exp in two parts (cross_entropy_cpu_args.h): written by the forward, read
  // by the backward.
  acc_t* lse_max;
  acc_t* lse_log_sum;

  __device__ __forceinline__ acc_t wc(int64_t c) const { return w ? w[c] : acc_t(1); }
  __device__ __forceinline__ acc_t weight_sum() const {
    return w_sum ? *w_sum : static_cast<acc_t>(C);
  }
  __device__ __forceinline__ int64_t target(int64_t n, int64_t d) const {
    return t[n * t_sn + d * t_sd];
  }
  // Records row r as holding an out-of-range target (the smallest such row wins: an integer
  // minimum, the same whatever the order).
  __device__ __forceinline__ void report_bad(int64_t r) const {
    if (bad) atomicMin(reinterpret_cast<long long*>(bad), static_cast<long long>(r));
  }
};

// The reference the smoothing / probability sums of a row are taken relative to.
template <typename T>
__device__ __forceinline__ acc_type<T> row_reference(const T* xr) {
  const acc_type<T> v = static_cast<acc_type<T>>(xr[0]);
  return isfinite(v) ? v : acc_type<T>(0);
}

// ------------------------------------------------------------------------------ row walking

// A row's cut for packs of V: h head classes, then P packs (pack p holds classes h + p * V ...),
// then the tail up to C.
struct RowSpan {
  int64_t h, P;
};

template <typename T, int V>
__device__ __forceinline__ RowSpan row_span(const T* row, int64_t C) {
  if constexpr (V == 1) {
    return {0, C};
  } else {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(row) / sizeof(T)) % V;
    const int64_t h = std::min<int64_t>(C, (V - mis) % V);
    return {h, (C - h) / V};
  }
}

template <typename T, int W>
__device__ __forceinline__ void load_vals(const T* row, int64_t c, int64_t sc,
                                          acc_type<T> (&v)[W]) {
  if constexpr (W == 1) {
    v[0] = static_cast<acc_type<T>>(row[c * sc]);
  } else {
    const cuda::Pack<T, W> p = *reinterpret_cast<const cuda::Pack<T, W>*>(row + c);
#pragma unroll
    for (int j = 0; j < W; ++j) v[j] = static_cast<acc_type<T>>(p.v[j]);
  }
}

template <typename T, int W>
__device__ __forceinline__ void store_vals(T* row, int64_t c, int64_t sc,
                                           const acc_type<T> (&v)[W]) {
  if constexpr (W == 1) {
    row[c * sc] = static_cast<T>(v[0]);
  } else {
    cuda::Pack<T, W> p;
#pragma unroll
    for (int j = 0; j < W; ++j) p.v[j] = static_cast<T>(v[j]);
    *reinterpret_cast<cuda::Pack<T, W>*>(row + c) = p;
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// This thread's share (lane of a team of G) of a row: packs [p0, p1) kUnroll at a time, and,
// where asked, the head and tail classes one at a time. f(Int<W>, Int<K>, cls, n): K slots of W
// contiguous classes, slot k starting at class cls[k]; the first n slots are valid.
template <int V, typename F>
__device__ __forceinline__ void walk_row(const RowSpan& sp, int64_t C, int64_t p0, int64_t p1,
                                         bool head, bool tail, int64_t lane, int64_t G,
                                         const F& f) {
  if (head) {
    for (int64_t c = lane; c < sp.h; c += G) {
      const int64_t cls[1] = {c};
      f(Int<1>(), Int<1>(), cls, 1);
    }
  }
  for (int64_t p = p0 + lane; p < p1; p += G * kUnroll) {
    int64_t cls[kUnroll];
    int n = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t pu = p + u * G;
      cls[u] = sp.h + pu * V;
      n += pu < p1 ? 1 : 0;
    }
    f(Int<V>(), Int<kUnroll>(), cls, n);
  }
  if (tail) {
    for (int64_t c = sp.h + sp.P * V + lane; c < C; c += G) {
      const int64_t cls[1] = {c};
      f(Int<1>(), Int<1>(), cls, 1);
    }
  }
}

// ------------------------------------------------------------------------------ launch plans

// Rows of more packs than this take a block each (or several).
constexpr int64_t kLongRowUnits = 512;
// Blocks that fill an H100 a few times over; a shape-only constant, so that the cut of the work
// (and with it every reduction order) does not depend on the device.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMaxGrid = 65536;
// Rows below this many take teams per row rather than one thread per row.
constexpr int64_t kLanesMinRows = 1024;

struct Plan {
  bool packed;      // V = 16 bytes of T, else 1
  bool long_rows;   // a block per row (split in `splits`), else G lanes per row
  int G;            // lanes per row: 1, 8 or 32
  int64_t splits;   // blocks per long row
  int64_t rows_per_block;
  int64_t grid;
};

// `lanes`: one thread per row; `split`: long rows may be cut over several blocks.
inline Plan plan_rows(int64_t R, int64_t C, int vec, bool packed, bool lanes, bool split) {
  Plan p{};
  p.packed = packed && !lanes;
  const int64_t V = p.packed ? vec : 1;
  const int64_t units = (C + V - 1) / V;
  if (!lanes && units > kLongRowUnits) {
    p.long_rows = true;
    p.G = kThreads;
    p.splits = 1;
    if (split && R < kTargetBlocks) {
      const int64_t by_work = std::max<int64_t>(1, units / (kThreads * 8));
      p.splits = std::min((kTargetBlocks + R - 1) / R, by_work);
    }
    p.grid = std::min(R * p.splits, kMaxGrid);
    return p;
  }
  p.G = lanes ? 1 : (units >= 64 ? 32 : 8);
  const int64_t groups = kThreads / p.G;
  // A block walks a few thousand values, but the grid keeps ~1000 blocks where there are rows.
  const int64_t by_work = (4096 + groups * C - 1) / (groups * C);
  const int64_t by_rows = R / (groups * 1024);
  const int64_t iters = std::max<int64_t>(1, std::min<int64_t>({by_work, by_rows, 64}));
  p.rows_per_block = groups * iters;
  p.grid = (R + p.rows_per_block - 1) / p.rows_per_block;
  TORCH_CHECK(p.grid <= INT_MAX, "dlext::cross_entropy: too many rows (", R, ")");
  return p;
}

// Whether a row of t (element strides sn, sd of its (N, C, D) view) starts at the same offset
// modulo 16 bytes as the same row of x: then one head length serves both.
inline bool same_phase(const void* px, int64_t x_sn, int64_t x_sd, const void* pt, int64_t t_sn,
                       int64_t t_sd, int64_t N, int64_t D, int64_t elt) {
  auto mod16 = [](int64_t v) { return ((v % 16) + 16) % 16; };
  const int64_t dp = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(px) % 16) -
                     static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(pt) % 16);
  return mod16(dp) == 0 && (N <= 1 || mod16((x_sn - t_sn) * elt) == 0) &&
         (D <= 1 || mod16((x_sd - t_sd) * elt) == 0);
}

// Whether the lanes walk (one thread per row) reads x coalesced: neighbouring rows adjacent.
inline bool rows_adjacent(int64_t D, int64_t x_sn, int64_t x_sd) {
  return D > 1 ? x_sd == 1 : x_sn == 1;
}

// f(Int<G>) for G of the plan.
template <typename F>
void with_team(int G, const F& f) {
  if (G == 1) {
    f(Int<1>());
  } else if (G == 8) {
    f(Int<8>());
  } else {
    f(Int<32>());
  }
}

// f(Int<V>) for V = 16 bytes of T when packed, else 1.
template <typename T, typename F>
void with_pack(bool packed, const F& f) {
  if (packed) {
    f(Int<cuda::kVec16<T>>());
  } else {
    f(Int<1>());
  }
}

// ------------------------------------------------------------------------ weight sum kernel

// out = sum of the C weights (the smoothing's sum_c w_c), in a fixed order: thread i sums
// i, i + kThreads, ..., then the block's tree.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    weight_sum_kernel(const acc_t* __restrict__ w, int64_t C, acc_t* __restrict__ out) {
  __shared__ Sum<acc_t> smem[cuda::kWarpSize];
  Sum<acc_t> s{0};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s.v += w[c];
  s = cuda::block_reduce(s, Sum<acc_t>{0}, smem);
  if (threadIdx.x == 0) *out = s.v;
}

template <typename acc_t>
void launch_weight_sum(const acc_t* w, int64_t C, acc_t* out) {
  weight_sum_kernel<acc_t><<<1, kThreads, 0, cuda::current_stream()>>>(w, C, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernels' Args for `in` (logits, targets or probabilities, weights, smoothing) with the lse
// parts at lse_max; the weight sum the smoothing needs is computed on the device into w_sum,
// which the caller keeps alive until the kernels have run. Shared by the forward and backward.
template <typename T>
Args<T> make_args(const Inputs& in, acc_type<T>* lse_max, at::Tensor& w_sum) {
  using acc_t = acc_type<T>;
  Args<T> A{};
  A.N = in.x.size(0);
  A.C = in.x.size(1);
  A.D = in.x.size(2);
  A.x = in.x.const_data_ptr<T>();
  A.x_sn = in.x.stride(0);
  A.x_sc = in.x.stride(1);
  A.x_sd = in.x.stride(2);
  if (in.t.defined()) {
    A.t = in.t.const_data_ptr<int64_t>();
    A.t_sn = in.t.stride(0);
    A.t_sd = in.t.stride(1);
  } else {
    A.y = in.y.const_data_ptr<T>();
    A.y_sn = in.y.stride(0);
    A.y_sc = in.y.stride(1);
    A.y_sd = in.y.stride(2);
  }
  if (in.w.defined()) {
    A.w = in.w.const_data_ptr<acc_t>();
    if (in.smooth) {
      w_sum = at::empty({}, in.w.options());
      launch_weight_sum(A.w, A.C, w_sum.mutable_data_ptr<acc_t>());
      A.w_sum = w_sum.const_data_ptr<acc_t>();
    }
  }
  A.smooth = in.smooth;
  A.a = static_cast<acc_t>(in.a);
  A.b = static_cast<acc_t>(in.b);
  A.ignore_index = in.ignore_index;
  A.bad = in.bad;
  A.lse_max = lse_max;
  A.lse_log_sum = lse_max + A.N * A.D;
  return A;
}

}  // namespace ce_cuda
}  // namespace dlext
