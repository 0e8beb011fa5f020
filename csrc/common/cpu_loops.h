// Elementwise loops for the CPU kernels over flat, dense memory.
//
// Why they are fast: at::parallel_for splits the range into per-thread chunks (one thread below
// kGrain elements, so small tensors pay no threading cost); inside a chunk the body is
// at::vec::Vectorized (AVX2 when the build targets it) unrolled four vectors deep so loads of
// independent vectors overlap, with the pointers held in locals so the compiler keeps them in
// registers. The scalar tail applies the same formula.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace dlext {
namespace cpu {

constexpr int64_t kGrain = 32768;  // elements per task

// out[i] = sop(a[i]); vop is the same formula on Vectorized<scalar_t>.
template <typename scalar_t, typename VecOp, typename ScalarOp>
void unary_loop(const scalar_t* a, scalar_t* out, int64_t n, const VecOp& vop,
                const ScalarOp& sop) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    // Locals, not closure members: a store through `out` may alias a member (say a Vectorized
    // constant inside vop), which would force a reload of every member after every store.
    const scalar_t* const pa = a;
    scalar_t* const po = out;
    const VecOp op = vop;
    constexpr int64_t W = Vec::size();
    int64_t i = begin;
    for (; i + 4 * W <= end; i += 4 * W) {
      const Vec v0 = Vec::loadu(pa + i), v1 = Vec::loadu(pa + i + W);
      const Vec v2 = Vec::loadu(pa + i + 2 * W), v3 = Vec::loadu(pa + i + 3 * W);
      op(v0).store(po + i);
      op(v1).store(po + i + W);
      op(v2).store(po + i + 2 * W);
      op(v3).store(po + i + 3 * W);
    }
    for (; i + W <= end; i += W) op(Vec::loadu(pa + i)).store(po + i);
    for (; i < end; ++i) po[i] = sop(pa[i]);
  });
}

// out[i] = sop(a[i], b[i]); vop is the same formula on Vectorized<scalar_t>.
template <typename scalar_t, typename VecOp, typename ScalarOp>
void binary_loop(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n,
                 const VecOp& vop, const ScalarOp& sop) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, n, kGrain, [=](int64_t begin, int64_t end) {
    const scalar_t* const pa = a;
    const scalar_t* const pb = b;
    scalar_t* const po = out;
    const VecOp op = vop;
    constexpr int64_t W = Vec::size();
    int64_t i = begin;
    for (; i + 2 * W <= end; i += 2 * W) {
      const Vec a0 = Vec::loadu(pa + i), a1 = Vec::loadu(pa + i + W);
      const Vec b0 = Vec::loadu(pb + i), b1 = Vec::loadu(pb + i + W);
      op(a0, b0).store(po + i);
      op(a1, b1).store(po + i + W);
    }
    for (; i + W <= end; i += W) op(Vec::loadu(pa + i), Vec::loadu(pb + i)).store(po + i);
    for (; i < end; ++i) po[i] = sop(pa[i], pb[i]);
  });
}

}  // namespace cpu
}  // namespace dlext
