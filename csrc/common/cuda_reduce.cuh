// Deterministic reductions for the CUDA kernels: Welford moments with Chan's merge, and warp /
// block reductions of any mergeable value in a fixed order.
//
// Every reduction here combines values in an order that depends only on the launch shape (a
// shuffle-down tree inside a warp, then the warps' results in warp order), never on timing, so a
// result is bitwise reproducible from run to run. No atomics. Two-stage reductions over a grid
// (per-block partials in a workspace, then a second pass that merges them in a fixed order) are
// built from the same pieces.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dlext {
namespace cuda {

constexpr int kWarpSize = 32;

// Count, mean and M2 (sum of squared deviations from the mean) of a set of values.
template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  int64_t n;
};

// a U b by the parallel-variance formula (Chan, Golub, LeVeque 1979): exact in exact arithmetic,
// stable in floating point because it only adds squared deviations. An empty side is the
// identity, so {0, 0, 0} starts any reduction. The formula is the CPU kernels'
// (batch_norm/batch_norm_cpu_vec.h).
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean;
  const acc_t fb = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
  return {a.mean + delta * fb, a.m2 + b.m2 + delta * delta * (static_cast<acc_t>(a.n) * fb), n};
}

// A pair of sums reduced together (for instance sum dy and sum dy * (x - mean)).
template <typename acc_t>
struct SumPair {
  acc_t a;
  acc_t b;
};

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> merge(const SumPair<acc_t>& x, const SumPair<acc_t>& y) {
  return {x.a + y.a, x.b + y.b};
}

// Lane i receives lane i + delta's value (its own where i + delta is past the warp).
__device__ __forceinline__ float shfl_down(float v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
__device__ __forceinline__ double shfl_down(double v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
__device__ __forceinline__ long long shfl_down(long long v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
__device__ __forceinline__ int64_t shfl_down_i64(int64_t v, int delta) {
  return static_cast<int64_t>(shfl_down(static_cast<long long>(v), delta));
}
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_down(const Welford<acc_t>& w, int delta) {
  return {shfl_down(w.mean, delta), shfl_down(w.m2, delta), shfl_down_i64(w.n, delta)};
}
template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> shfl_down(const SumPair<acc_t>& s, int delta) {
  return {shfl_down(s.a, delta), shfl_down(s.b, delta)};
}

// The merge of the 32 lanes' values, in lane 0 (a tree: lane i takes lane i + 16, then i + 8,
// ...). Every lane of the warp must call it.
template <typename V>
__device__ __forceinline__ V warp_reduce(V v) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) v = merge(v, shfl_down(v, delta));
  return v;
}

// The merge of every thread's value of a 1-D block (blockDim.x a multiple of 32, at most 1024),
// in thread 0: each warp's tree, then warp 0 merges the warps' results in warp order.
// `identity` merges as a no-op; `smem` holds 32 values. Every thread of the block must call it;
// the caller synchronises before `smem` is used again.
template <typename V>
__device__ __forceinline__ V block_reduce(V v, const V& identity, V* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_reduce(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarpSize) ? smem[lane] : identity;
    v = warp_reduce(v);
  }
  return v;
}

}  // namespace cuda
}  // namespace dlext
