// BatchNorm backward on CUDA: the per-channel sums sum(dy) and sum(dy * (x - mean)), and the
// input gradient dx = (dy - mean_dy - (x - mean) * k) * a in training (k = invstd^2 *
// sum_dy_xmu / count, a = invstd * weight) or dx = dy * a in evaluation, for the operators
// backward_reduce, backward_elemt and batch_norm_backward. Building blocks and layouts:
// batch_norm_cuda_kernels.cuh.
//
// Why it is fast. Memory-bound: 16-byte loads and stores with kUnroll in flight per thread,
// coalesced along L (planes) or C (rows). The sums are two-stage and deterministic (per-block
// partials merged per channel in a fixed order), with enough blocks per channel to fill the GPU
// when there are few channels. With many channels, one block per channel sums, finishes the
// channel (grad_weight, grad_bias, coefficients) and writes dx in a single launch, its second
// read of dy and x served from L2 (a fused reduce + apply).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "batch_norm/batch_norm_cuda.h"
#include "batch_norm/batch_norm_cuda_kernels.cuh"

namespace dlext {
namespace bn_cuda {
namespace {

// ------------------------------------------------------------------------------ epilogues

// batch_norm_backward_reduce: the sums (null when not wanted), grad_weight = sum_dy_xmu * invstd
// and grad_bias = sum_dy (undefined refs when not wanted).
template <typename acc_t>
struct ReduceOut {
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  ChannelRef invstd, grad_weight, grad_bias;

  __device__ void operator()(int64_t c, const SumPair<acc_t>& s) const {
    if (sum_dy != nullptr) {
      sum_dy[c] = s.a;
      sum_dy_xmu[c] = s.b;
    }
    grad_weight.set(c, s.b * invstd.get(c, acc_t(0)));
    grad_bias.set(c, s.a);
  }
};

// batch_norm_backward: grad_weight and grad_bias (undefined refs when not wanted), and the
// channel's GradCoeffs (into `table` when not null) for sums over `count` values per channel.
template <typename acc_t>
struct BackwardOut {
  ChannelRef mean, invstd, weight, grad_weight, grad_bias;
  int64_t count;
  GradCoeffs<acc_t>* table;

  __device__ GradCoeffs<acc_t> operator()(int64_t c, const SumPair<acc_t>& s) const {
    const acc_t is = invstd.get(c, acc_t(0));
    grad_weight.set(c, s.b * is);
    grad_bias.set(c, s.a);
    const acc_t n = static_cast<acc_t>(count);
    const GradCoeffs<acc_t> k{mean.get(c, acc_t(0)), s.a / n, s.b * is * is / n,
                              is * weight.get(c, acc_t(1))};
    if (table != nullptr) table[c] = k;
    return k;
  }
};

// batch_norm_backward_elemt: the GradCoeffs of given sums over `count` values per channel.
template <typename acc_t>
struct ElemtBackward {
  ChannelRef mean, invstd, weight, sum_dy, sum_dy_xmu;
  int64_t count;
  GradCoeffs<acc_t>* table;

  __device__ void operator()(int64_t c, const SumPair<acc_t>&) const {
    const acc_t is = invstd.get(c, acc_t(0));
    const acc_t n = static_cast<acc_t>(count);
    table[c] = {mean.get(c, acc_t(0)), sum_dy.get(c, acc_t(0)) / n,
                sum_dy_xmu.get(c, acc_t(0)) * is * is / n, is * weight.get(c, acc_t(1))};
  }
};

// ------------------------------------------------------------------------------------ sums

// This thread's sum dy and sum dy * (x - mean) over packs [begin, end) of channel c.
template <typename T, int V>
__device__ __forceinline__ SumPair<acc_type<T>> thread_plane_sums(const T* __restrict__ dy,
                                                                  const T* __restrict__ x,
                                                                  const Planes& g, int64_t c,
                                                                  int64_t begin, int64_t end,
                                                                  acc_type<T> mean) {
  using acc_t = acc_type<T>;
  SumPair<acc_t> s{0, 0};
  for_each_plane_batch(g, c, begin, end, [&](const int64_t* off, int valid) {
    Pack<T, V> gp[kUnroll], xp[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (k < valid) {
        gp[k] = load_pack<T, V>(dy, off[k]);
        xp[k] = load_pack<T, V>(x, off[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (k < valid) {
          const acc_t d = static_cast<acc_t>(gp[k].v[j]);
          s.a += d;
          s.b += d * (static_cast<acc_t>(xp[k].v[j]) - mean);
        }
      }
    }
  });
  return s;
}

// Partial sums of every (channel, split) task: parts[s * C + c].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_planes_kernel(const T* __restrict__ dy, const T* __restrict__ x, Planes g,
                       ChannelRef mean, SumPair<acc_type<T>>* __restrict__ parts) {
  using acc_t = acc_type<T>;
  __shared__ SumPair<acc_t> smem[cuda::kWarpSize];
  const int64_t tasks = g.C * g.splits;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t c = task / g.splits, s = task % g.splits;
    int64_t begin, end;
    g.range(s, begin, end);
    SumPair<acc_t> sums =
        thread_plane_sums<T, V>(dy, x, g, c, begin, end, mean.get(c, acc_t(0)));
    sums = cuda::block_reduce(sums, SumPair<acc_t>{0, 0}, smem);
    if (threadIdx.x == 0) parts[s * g.C + c] = sums;
    __syncthreads();  // smem is reused by the next task
  }
}

// Partial sums of a tile of channels over a range of rows: parts[s * C + c]; the block's rows
// add up by a tree over threadIdx.y in shared memory.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x, Rows g, ChannelRef mean,
                     SumPair<acc_type<T>>* __restrict__ parts) {
  using acc_t = acc_type<T>;
  __shared__ acc_t s_dy[V][kThreads];
  __shared__ acc_t s_dyxmu[V][kThreads];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = p < g.Cv;
  int64_t begin, end;
  g.range(blockIdx.y, begin, end);
  acc_t sdy[V], sdxm[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sdy[j] = sdxm[j] = 0;
  if (active) {
    acc_t m[V];
#pragma unroll
    for (int j = 0; j < V; ++j) m[j] = mean.get(p * V + j, acc_t(0));
    for_each_row_batch(begin, end, [&](int64_t r, int64_t stride, int valid) {
      Pack<T, V> gq[kUnroll], xq[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (k < valid) {
          const int64_t i = (r + k * stride) * g.Cv + p;
          gq[k] = load_pack<T, V>(dy, i);
          xq[k] = load_pack<T, V>(x, i);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (k < valid) {
            const acc_t d = static_cast<acc_t>(gq[k].v[j]);
            sdy[j] += d;
            sdxm[j] += d * (static_cast<acc_t>(xq[k].v[j]) - m[j]);
          }
        }
      }
    });
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s_dy[j][tid] = sdy[j];
    s_dyxmu[j][tid] = sdxm[j];
  }
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      const int other = tid + half * blockDim.x;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        s_dy[j][tid] += s_dy[j][other];
        s_dyxmu[j][tid] += s_dyxmu[j][other];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      parts[blockIdx.y * g.C + p * V + j] = SumPair<acc_t>{s_dy[j][tid], s_dyxmu[j][tid]};
    }
  }
}

// Partial sums of every channel; returns the number of partials per channel (0 when the
// channels have no values).
template <typename T, int V>
int64_t launch_sums(const T* dy, const T* x, const Layout& g, const ChannelRef& mean,
                    at::Tensor& holder, const at::Tensor& like, SumPair<acc_type<T>>*& parts) {
  parts = nullptr;
  if (g.count() == 0 || g.C == 0) return 0;
  if (g.rows) {
    const RowsLaunch r = plan_rows(g, V);
    parts = workspace<SumPair<acc_type<T>>>(holder, like, r.g.splits * g.C);
    sums_rows_kernel<T, V><<<r.grid, r.block, 0, cuda::current_stream()>>>(dy, x, r.g, mean,
                                                                           parts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return r.g.splits;
  }
  const Planes pl = plan_planes(g, V);
  parts = workspace<SumPair<acc_type<T>>>(holder, like, pl.splits * g.C);
  sums_planes_kernel<T, V><<<task_grid(g.C * pl.splits), kThreads, 0, cuda::current_stream()>>>(
      dy, x, pl, mean, parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pl.splits;
}

// --------------------------------------------------------------------------- input gradient

// dx of a batch of up to kUnroll packs (slots k < valid at pack offsets off(k)): training
// (reads dy and x) or evaluation (reads dy only) formula.
template <typename T, int V, bool kTrain, typename Offset>
__device__ __forceinline__ void grad_batch(const T* __restrict__ dy, const T* __restrict__ x,
                                           T* __restrict__ dx, int valid, const Offset& off,
                                           const GradCoeffs<acc_type<T>>* k, int k_stride) {
  using acc_t = acc_type<T>;
  Pack<T, V> gp[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) gp[u] = load_pack<T, V>(dy, off(u));
  }
  if constexpr (kTrain) {
    Pack<T, V> xp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < valid) xp[u] = load_pack<T, V>(x, off(u));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < valid) {
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const GradCoeffs<acc_t>& c = k[j * k_stride];
          const acc_t d = static_cast<acc_t>(gp[u].v[j]) - c.mean_dy;
          o.v[j] = static_cast<T>((d - (static_cast<acc_t>(xp[u].v[j]) - c.mean) * c.k) * c.a);
        }
        store_pack<T, V>(dx, off(u), o);
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < valid) {
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          o.v[j] = static_cast<T>(static_cast<acc_t>(gp[u].v[j]) * k[j * k_stride].a);
        }
        store_pack<T, V>(dx, off(u), o);
      }
    }
  }
}

template <typename T, int V, bool kTrain>
__device__ __forceinline__ void grad_plane_range(const T* __restrict__ dy, const T* __restrict__ x,
                                                 T* __restrict__ dx, const Planes& g, int64_t c,
                                                 int64_t begin, int64_t end,
                                                 GradCoeffs<acc_type<T>> k) {
  // k by value: kept in registers, not reloaded after each store to dx.
  for_each_plane_batch(g, c, begin, end, [&](const int64_t* off, int valid) {
    grad_batch<T, V, kTrain>(dy, x, dx, valid, [&](int u) { return off[u]; }, &k, 0);
  });
}

template <typename T, int V, bool kTrain>
__global__ void __launch_bounds__(kThreads)
    grad_planes_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                       Planes g, const GradCoeffs<acc_type<T>>* __restrict__ table) {
  const int64_t tasks = g.C * g.splits;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t c = task / g.splits, s = task % g.splits;
    int64_t begin, end;
    g.range(s, begin, end);
    grad_plane_range<T, V, kTrain>(dy, x, dx, g, c, begin, end, table[c]);
  }
}

template <typename T, int V, bool kTrain>
__global__ void __launch_bounds__(kThreads)
    grad_rows_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, Rows g,
                     const GradCoeffs<acc_type<T>>* __restrict__ table) {
  using acc_t = acc_type<T>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= g.Cv) return;
  GradCoeffs<acc_t> k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) k[j] = table[p * V + j];
  int64_t begin, end;
  g.range(blockIdx.y, begin, end);
  for_each_row_batch(begin, end, [&](int64_t r, int64_t stride, int valid) {
    grad_batch<T, V, kTrain>(dy, x, dx, valid, [&](int u) { return (r + u * stride) * g.Cv + p; },
                             k, 1);
  });
}

template <typename T, int V, bool kTrain>
void launch_grad(const T* dy, const T* x, T* dx, const Layout& g,
                 const GradCoeffs<acc_type<T>>* table) {
  if (g.count() == 0 || g.C == 0) return;
  if (g.rows) {
    const RowsLaunch r = plan_rows(g, V);
    grad_rows_kernel<T, V, kTrain><<<r.grid, r.block, 0, cuda::current_stream()>>>(dy, x, dx, r.g,
                                                                                   table);
  } else {
    const Planes pl = plan_planes(g, V);
    grad_planes_kernel<T, V, kTrain><<<task_grid(g.C * pl.splits), kThreads, 0,
                                       cuda::current_stream()>>>(dy, x, dx, pl, table);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --------------------------------------------------------------------------------- fused

// Training backward of whole channels (planes, one block per channel): the sums, the epilogue
// (grad_weight, grad_bias, coefficients) by thread 0, then dx, whose reads of dy and x come from
// L2 while few channels are in flight.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    backward_train_fused_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                T* __restrict__ dx, Planes g, BackwardOut<acc_type<T>> epilogue) {
  using acc_t = acc_type<T>;
  __shared__ SumPair<acc_t> smem[cuda::kWarpSize];
  __shared__ GradCoeffs<acc_t> coeffs;
  for (int64_t c = blockIdx.x; c < g.C; c += gridDim.x) {
    SumPair<acc_t> s =
        thread_plane_sums<T, V>(dy, x, g, c, 0, g.units, epilogue.mean.get(c, acc_t(0)));
    s = cuda::block_reduce(s, SumPair<acc_t>{0, 0}, smem);
    if (threadIdx.x == 0) coeffs = epilogue(c, s);
    __syncthreads();
    grad_plane_range<T, V, true>(dy, x, dx, g, c, 0, g.units, coeffs);
    __syncthreads();  // smem and coeffs are reused by the next channel
  }
}

template <typename T, int V>
void launch_grad_mode(bool train, const T* dy, const T* x, T* dx, const Layout& g,
                      const GradCoeffs<acc_type<T>>* table) {
  if (train) {
    launch_grad<T, V, true>(dy, x, dx, g, table);
  } else {
    launch_grad<T, V, false>(dy, x, dx, g, table);
  }
}

#define DLEXT_BN_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

}  // namespace

// ------------------------------------------------------------------------------ entry points

void backward_reduce(const at::Tensor& dy, const at::Tensor& x, const Layout& g,
                     const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dy,
                     const at::Tensor& sum_dy_xmu, const at::Tensor& grad_weight,
                     const at::Tensor& grad_bias) {
  DLEXT_BN_DISPATCH(x.scalar_type(), "dlext::batch_norm_backward_reduce", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    const T* pdy = dy.const_data_ptr<T>();
    const T* px = x.const_data_ptr<T>();
    const ReduceOut<acc_t> epilogue{
        sum_dy.defined() ? sum_dy.mutable_data_ptr<acc_t>() : nullptr,
        sum_dy_xmu.defined() ? sum_dy_xmu.mutable_data_ptr<acc_t>() : nullptr,
        channel_ref(invstd), channel_ref(grad_weight, true), channel_ref(grad_bias, true)};
    with_pack_size<T>(can_pack(g, cuda::kVec16<T>, {pdy, px}), [&](auto v) {
      at::Tensor holder;
      SumPair<acc_t>* parts;
      const int64_t nparts =
          launch_sums<T, decltype(v)::value>(pdy, px, g, channel_ref(mean), holder, x, parts);
      launch_channel_kernel(parts, nparts, g.C, epilogue);
    });
  });
}

void backward_elemt(const at::Tensor& dy, const at::Tensor& x, const Layout& g,
                    const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& weight,
                    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count,
                    const at::Tensor& grad_input) {
  DLEXT_BN_DISPATCH(x.scalar_type(), "dlext::batch_norm_backward_elemt", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    const T* pdy = dy.const_data_ptr<T>();
    const T* px = x.const_data_ptr<T>();
    T* pdx = grad_input.mutable_data_ptr<T>();
    at::Tensor table_holder;
    GradCoeffs<acc_t>* table = workspace<GradCoeffs<acc_t>>(table_holder, x, g.C);
    launch_channel_kernel(static_cast<const SumPair<acc_t>*>(nullptr), 0, g.C,
                          ElemtBackward<acc_t>{channel_ref(mean), channel_ref(invstd),
                                               channel_ref(weight), channel_ref(sum_dy),
                                               channel_ref(sum_dy_xmu), count, table});
    with_pack_size<T>(can_pack(g, cuda::kVec16<T>, {pdy, px, pdx}), [&](auto v) {
      launch_grad<T, decltype(v)::value, true>(pdy, px, pdx, g, table);
    });
  });
}

void backward(const at::Tensor& dy, const at::Tensor& x, const Layout& g, const OptTensor& weight,
              const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
              const at::Tensor& grad_input, const at::Tensor& grad_weight,
              const at::Tensor& grad_bias) {
  const bool want_dx = grad_input.defined();
  // The sums are needed for grad_weight, grad_bias and the training-mode dx.
  const bool reduce = grad_weight.defined() || grad_bias.defined() || (want_dx && training);
  DLEXT_BN_DISPATCH(x.scalar_type(), "dlext::batch_norm_backward", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    const T* pdy = dy.const_data_ptr<T>();
    const T* px = x.const_data_ptr<T>();
    T* pdx = want_dx ? grad_input.mutable_data_ptr<T>() : nullptr;
    BackwardOut<acc_t> epilogue{channel_ref(save_mean), channel_ref(save_invstd),
                                channel_ref(weight), channel_ref(grad_weight, true),
                                channel_ref(grad_bias, true), g.count(), nullptr};
    with_pack_size<T>(can_pack(g, cuda::kVec16<T>, {pdy, px, pdx}), [&](auto v) {
      constexpr int V = decltype(v)::value;
      if (want_dx && training && !g.rows && g.count() > 0) {
        const Planes pl = plan_planes(g, V);
        if (pl.splits == 1) {  // one block per channel: reduce and apply in one launch
          backward_train_fused_kernel<T, V><<<task_grid(g.C), kThreads, 0,
                                              cuda::current_stream()>>>(pdy, px, pdx, pl,
                                                                        epilogue);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      at::Tensor holder, table_holder;
      SumPair<acc_t>* parts = nullptr;
      const int64_t nparts =
          reduce ? launch_sums<T, V>(pdy, px, g, epilogue.mean, holder, x, parts) : 0;
      if (want_dx) epilogue.table = workspace<GradCoeffs<acc_t>>(table_holder, x, g.C);
      launch_channel_kernel(static_cast<const SumPair<acc_t>*>(parts), nparts, g.C, epilogue);
      if (want_dx) launch_grad_mode<T, V>(training, pdy, px, pdx, g, epilogue.table);
    });
  });
}

#undef DLEXT_BN_DISPATCH

}  // namespace bn_cuda
}  // namespace dlext
