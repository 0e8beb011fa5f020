// The bias gradient on the CPU: db[k] = sum over images and output pixels of dy[., k, ., .].
//
// Why it is fast: one streaming pass over dy. NCHW sums each contiguous plane with vector
// accumulators, threads splitting the channels; NHWC adds whole rows of channels into a row of
// accumulators (vectorised across channels), threads splitting column blocks. Every sum runs in a
// fixed order within one thread: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "conv2d/conv2d_kernels_cpu.h"

namespace dlext {
namespace conv2d_cpu {
namespace {

constexpr int64_t kColumnBlock = 64;          // NHWC: channels summed together by one thread
constexpr int64_t kMinTaskElements = 1 << 16;  // less than this is not worth a thread

template <typename T>
T plane_sum(const T* p, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc0(T(0)), acc1(T(0));
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    acc0 += Vec::loadu(p + j);
    acc1 += Vec::loadu(p + j + Vec::size());
  }
  T sum = at::vec::vec_reduce_all([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
  for (; j < n; ++j) sum += p[j];
  return sum;
}

template <typename T>
void bias_backward_kernel(const Conv2dGeometry& g, const T* dy, T* db) {
  const int64_t P = g.Ho * g.Wo, K = g.K;
  const int64_t rows = g.N * P;
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / (rows + 1));
    at::parallel_for(0, K, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        T sum(0);
        for (int64_t n = 0; n < g.N; ++n) sum += plane_sum(dy + (n * K + k) * P, P);
        db[k] = sum;
      }
    });
    return;
  }
  const int64_t blocks = (K + kColumnBlock - 1) / kColumnBlock;
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / (rows * kColumnBlock + 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(kColumnBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k0 = blk * kColumnBlock, width = std::min(kColumnBlock, K - k0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t q = 0; q < rows; ++q) {
        const T* row = dy + q * K + k0;
        for (int64_t j = 0; j < width; ++j) acc[j] += row[j];
      }
      std::copy(acc.begin(), acc.begin() + width, db + k0);
    }
  });
}

}  // namespace

void bias_backward(const Conv2dGeometry& g, const at::Tensor& dy, at::Tensor& db) {
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "dlext::conv2d_backward", [&] {
    bias_backward_kernel<scalar_t>(g, dy.const_data_ptr<scalar_t>(),
                                   db.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace conv2d_cpu
}  // namespace dlext
