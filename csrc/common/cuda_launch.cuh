// Launch configuration and vector access shared by the CUDA kernels.
//
// Memory-bound kernels here use 16-byte accesses (Pack<T, 16 / sizeof(T)>) when every pointer they
// touch is 16-byte aligned, and a grid-stride loop over a grid sized to fill the device a few
// times over, so one launch covers tensors of any size with 64-bit indices.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace dlext {
namespace cuda {

// `N` values of T read or written as one aligned transaction.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
constexpr int kVec16 = 16 / sizeof(T) > 0 ? static_cast<int>(16 / sizeof(T)) : 1;

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Streaming multiprocessors of the current device (queried once per device).
inline int sm_count() {
  static int counts[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && counts[dev] > 0) return counts[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) counts[dev] = n;
  return n;
}

// Blocks for a grid-stride loop over `work` items at `threads` per block: enough to cover the work
// up to `waves` resident blocks per SM, never zero.
inline unsigned grid_for(int64_t work, int threads, int waves = 8) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * waves;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, cap)));
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

}  // namespace cuda
}  // namespace dlext
