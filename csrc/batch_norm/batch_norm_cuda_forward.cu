// BatchNorm forward on CUDA: per-channel statistics, and the normalisation y = (x - mean) * scale
// + shift (scale = invstd * weight, shift = bias), for the operators stats, batch_norm (training
// and evaluation) and elemt. Building blocks and layouts: batch_norm_cuda_kernels.cuh.
//
// Statistics. Each thread loads kUnroll packs, takes their mean and their sum of squared
// deviations from it while they sit in registers (a two-pass variance over the batch, shifted by
// the channel's first value), and folds the batch into its running (count, mean, M2) with Chan's
// merge; a block merges its threads (warp trees, then warps in order), and the per-block partials
// are merged per channel in a fixed order by channel_kernel. This is as stable as Welford's
// update (never E[x^2] - E[x]^2) at a fraction of its divisions, and bitwise reproducible.
//
// Why it is fast. Memory-bound: 16-byte loads and stores, kUnroll of them in flight per thread,
// coalesced along L (planes) or C (rows). Planes give each channel enough blocks to fill the GPU
// when there are few channels (native BatchNorm uses one block per channel); with many channels
// one block per channel runs statistics, running-statistics update and normalisation in a single
// launch (the fused kernel), its second read of the channel served from L2. Evaluation and elemt
// are one elementwise pass after a per-channel kernel that prepares the coefficients.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "batch_norm/batch_norm_cuda.h"
#include "batch_norm/batch_norm_cuda_kernels.cuh"

namespace dlext {
namespace bn_cuda {
namespace {

// ------------------------------------------------------------------------------ epilogues

// batch_norm_stats: mean and biased variance; 0 and 0 for a channel without values.
template <typename T>
struct StatsOut {
  using acc_t = acc_type<T>;
  const T* x;
  int64_t shift_stride;  // the first value of channel c is x[c * shift_stride]
  acc_t* mean;
  acc_t* var;

  __device__ void operator()(int64_t c, const Welford<acc_t>& w) const {
    if (w.n == 0) {
      mean[c] = 0;
      var[c] = 0;
      return;
    }
    mean[c] = w.mean + channel_shift(x, c * shift_stride);
    var[c] = w.m2 / static_cast<acc_t>(w.n);
  }
};

// batch_norm in training: save_mean / save_invstd, the running statistics (unbiased variance,
// NaN for a single value as in torch), and the channel's Affine (into `table` when not null).
// A channel without values keeps its running statistics (as in torch).
template <typename T>
struct TrainForward {
  using acc_t = acc_type<T>;
  const T* x;
  int64_t shift_stride;
  ChannelRef weight, bias, running_mean, running_var;
  double momentum, eps;
  acc_t* save_mean;
  acc_t* save_invstd;
  Affine<acc_t>* table;

  __device__ Affine<acc_t> operator()(int64_t c, const Welford<acc_t>& w) const {
    if (w.n == 0) {
      save_mean[c] = 0;
      save_invstd[c] = train_invstd(acc_t(0), eps);
      return {acc_t(0), acc_t(0), acc_t(0)};
    }
    const acc_t mean = w.mean + channel_shift(x, c * shift_stride);
    const acc_t invstd = train_invstd(w.m2 / static_cast<acc_t>(w.n), eps);
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    update_running(running_mean, c, static_cast<double>(mean), momentum);
    const acc_t unbiased = w.m2 / static_cast<acc_t>(w.n - 1);
    update_running(running_var, c, static_cast<double>(unbiased), momentum);
    const Affine<acc_t> a{mean, invstd * weight.get(c, acc_t(1)), bias.get(c, acc_t(0))};
    if (table != nullptr) table[c] = a;
    return a;
  }
};

// batch_norm in evaluation: the running statistics (invstd = 1 / sqrt(running_var + eps) in
// acc_t, as torch computes it), save_mean / save_invstd, and the Affine.
template <typename acc_t>
struct EvalForward {
  ChannelRef weight, bias, running_mean, running_var;
  double eps;
  acc_t* save_mean;
  acc_t* save_invstd;
  Affine<acc_t>* table;

  __device__ void operator()(int64_t c, const Welford<acc_t>&) const {
    const acc_t mean = running_mean.get(c, acc_t(0));
    const acc_t invstd =
        acc_t(1) / ::sqrt(running_var.get(c, acc_t(1)) + static_cast<acc_t>(eps));
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    table[c] = {mean, invstd * weight.get(c, acc_t(1)), bias.get(c, acc_t(0))};
  }
};

// batch_norm_elemt: the Affine of given mean and invstd.
template <typename acc_t>
struct ElemtForward {
  ChannelRef weight, bias, mean, invstd;
  Affine<acc_t>* table;

  __device__ void operator()(int64_t c, const Welford<acc_t>&) const {
    table[c] = {mean.get(c, acc_t(0)), weight.get(c, acc_t(1)) * invstd.get(c, acc_t(0)),
                bias.get(c, acc_t(0))};
  }
};

// ------------------------------------------------------------------------------- statistics

// This thread's moments of packs [begin, end) of channel c, shifted by `shift`: each batch of up
// to kUnroll packs by two passes over registers, folded in by Chan's merge.
template <typename T, int V>
__device__ __forceinline__ Welford<acc_type<T>> thread_plane_moments(const T* __restrict__ x,
                                                                     const Planes& g, int64_t c,
                                                                     int64_t begin, int64_t end,
                                                                     acc_type<T> shift) {
  using acc_t = acc_type<T>;
  Welford<acc_t> w{0, 0, 0};
  for_each_plane_batch(g, c, begin, end, [&](const int64_t* off, int valid) {
    Pack<T, V> p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (k < valid) p[k] = load_pack<T, V>(x, off[k]);
    }
    acc_t sum = 0;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (k < valid) sum += static_cast<acc_t>(p[k].v[j]) - shift;
      }
    }
    const int64_t n = static_cast<int64_t>(valid) * V;
    const acc_t mean = sum / static_cast<acc_t>(n);
    acc_t m2 = 0;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (k < valid) {
          const acc_t d = (static_cast<acc_t>(p[k].v[j]) - shift) - mean;
          m2 += d * d;
        }
      }
    }
    w = cuda::merge(w, Welford<acc_t>{mean, m2, n});
  });
  return w;
}

// Partial moments of every (channel, split) task: parts[s * C + c].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    stats_planes_kernel(const T* __restrict__ x, Planes g,
                        Welford<acc_type<T>>* __restrict__ parts) {
  using acc_t = acc_type<T>;
  __shared__ Welford<acc_t> smem[cuda::kWarpSize];
  const int64_t tasks = g.C * g.splits;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t c = task / g.splits, s = task % g.splits;
    int64_t begin, end;
    g.range(s, begin, end);
    Welford<acc_t> w =
        thread_plane_moments<T, V>(x, g, c, begin, end, channel_shift(x, c * g.L));
    w = cuda::block_reduce(w, Welford<acc_t>{0, 0, 0}, smem);
    if (threadIdx.x == 0) parts[s * g.C + c] = w;
    __syncthreads();  // smem is reused by the next task
  }
}

// Partial moments of a tile of channels over a range of rows: parts[s * C + c]. Each thread
// keeps the moments of its pack's V channels; the block's rows merge by a tree over threadIdx.y
// in shared memory.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    stats_rows_kernel(const T* __restrict__ x, Rows g, Welford<acc_type<T>>* __restrict__ parts) {
  using acc_t = acc_type<T>;
  __shared__ acc_t s_mean[V][kThreads];
  __shared__ acc_t s_m2[V][kThreads];
  __shared__ int64_t s_n[kThreads];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = p < g.Cv;
  int64_t begin, end;
  g.range(blockIdx.y, begin, end);
  acc_t mean[V], m2[V];
  int64_t n = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0;
  if (active) {
    acc_t shift[V];
#pragma unroll
    for (int j = 0; j < V; ++j) shift[j] = channel_shift(x, p * V + j);
    for_each_row_batch(begin, end, [&](int64_t r, int64_t stride, int valid) {
      Pack<T, V> q[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (k < valid) q[k] = load_pack<T, V>(x, (r + k * stride) * g.Cv + p);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t sum = 0;
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          if (k < valid) sum += static_cast<acc_t>(q[k].v[j]) - shift[j];
        }
        const acc_t bmean = sum / static_cast<acc_t>(valid);
        acc_t bm2 = 0;
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          if (k < valid) {
            const acc_t d = (static_cast<acc_t>(q[k].v[j]) - shift[j]) - bmean;
            bm2 += d * d;
          }
        }
        const Welford<acc_t> m =
            cuda::merge(Welford<acc_t>{mean[j], m2[j], n}, Welford<acc_t>{bmean, bm2, valid});
        mean[j] = m.mean;
        m2[j] = m.m2;
      }
      n += valid;
    });
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s_mean[j][tid] = mean[j];
    s_m2[j][tid] = m2[j];
  }
  s_n[tid] = n;
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      const int other = tid + half * blockDim.x;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const Welford<acc_t> m = cuda::merge(Welford<acc_t>{s_mean[j][tid], s_m2[j][tid], s_n[tid]},
                                             Welford<acc_t>{s_mean[j][other], s_m2[j][other],
                                                            s_n[other]});
        s_mean[j][tid] = m.mean;
        s_m2[j][tid] = m.m2;
      }
      s_n[tid] += s_n[other];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      parts[blockIdx.y * g.C + p * V + j] = Welford<acc_t>{s_mean[j][tid], s_m2[j][tid], s_n[tid]};
    }
  }
}

// Partial moments of every channel of the dense input x (V values per pack); returns the number
// of partials per channel (0 when the channels have no values).
template <typename T, int V>
int64_t launch_stats(const T* x, const Layout& g, at::Tensor& holder, const at::Tensor& like,
                     Welford<acc_type<T>>*& parts) {
  parts = nullptr;
  if (g.count() == 0 || g.C == 0) return 0;
  if (g.rows) {
    const RowsLaunch r = plan_rows(g, V);
    parts = workspace<Welford<acc_type<T>>>(holder, like, r.g.splits * g.C);
    stats_rows_kernel<T, V><<<r.grid, r.block, 0, cuda::current_stream()>>>(x, r.g, parts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return r.g.splits;
  }
  const Planes pl = plan_planes(g, V);
  parts = workspace<Welford<acc_type<T>>>(holder, like, pl.splits * g.C);
  stats_planes_kernel<T, V><<<task_grid(g.C * pl.splits), kThreads, 0, cuda::current_stream()>>>(
      x, pl, parts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pl.splits;
}

// ---------------------------------------------------------------------------- normalisation

template <typename T, int V>
__device__ __forceinline__ void normalise_plane_range(const T* __restrict__ x, T* __restrict__ y,
                                                      const Planes& g, int64_t c, int64_t begin,
                                                      int64_t end, Affine<acc_type<T>> a) {
  // a by value: kept in registers, not reloaded after each store to y.
  using acc_t = acc_type<T>;
  for_each_plane_batch(g, c, begin, end, [&](const int64_t* off, int valid) {
    Pack<T, V> p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (k < valid) p[k] = load_pack<T, V>(x, off[k]);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (k < valid) {
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          o.v[j] = static_cast<T>((static_cast<acc_t>(p[k].v[j]) - a.mean) * a.scale + a.shift);
        }
        store_pack<T, V>(y, off[k], o);
      }
    }
  });
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    normalise_planes_kernel(const T* __restrict__ x, T* __restrict__ y, Planes g,
                            const Affine<acc_type<T>>* __restrict__ table) {
  const int64_t tasks = g.C * g.splits;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t c = task / g.splits, s = task % g.splits;
    int64_t begin, end;
    g.range(s, begin, end);
    normalise_plane_range<T, V>(x, y, g, c, begin, end, table[c]);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    normalise_rows_kernel(const T* __restrict__ x, T* __restrict__ y, Rows g,
                          const Affine<acc_type<T>>* __restrict__ table) {
  using acc_t = acc_type<T>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= g.Cv) return;
  Affine<acc_t> a[V];
#pragma unroll
  for (int j = 0; j < V; ++j) a[j] = table[p * V + j];
  int64_t begin, end;
  g.range(blockIdx.y, begin, end);
  for_each_row_batch(begin, end, [&](int64_t r, int64_t stride, int valid) {
    Pack<T, V> q[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (k < valid) q[k] = load_pack<T, V>(x, (r + k * stride) * g.Cv + p);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (k < valid) {
        Pack<T, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          o.v[j] = static_cast<T>((static_cast<acc_t>(q[k].v[j]) - a[j].mean) * a[j].scale +
                                  a[j].shift);
        }
        store_pack<T, V>(y, (r + k * stride) * g.Cv + p, o);
      }
    }
  });
}

template <typename T, int V>
void launch_normalise(const T* x, T* y, const Layout& g, const Affine<acc_type<T>>* table) {
  if (g.count() == 0 || g.C == 0) return;
  if (g.rows) {
    const RowsLaunch r = plan_rows(g, V);
    normalise_rows_kernel<T, V><<<r.grid, r.block, 0, cuda::current_stream()>>>(x, y, r.g, table);
  } else {
    const Planes pl = plan_planes(g, V);
    normalise_planes_kernel<T, V><<<task_grid(g.C * pl.splits), kThreads, 0,
                                    cuda::current_stream()>>>(x, y, pl, table);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --------------------------------------------------------------------------------- fused

// Training forward of whole channels (planes, one block per channel): moments, the epilogue
// (saved and running statistics) by thread 0, then the normalisation, whose reads of the
// channel come from L2 while few channels are in flight.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    forward_train_fused_kernel(const T* __restrict__ x, T* __restrict__ y, Planes g,
                               TrainForward<T> epilogue) {
  using acc_t = acc_type<T>;
  __shared__ Welford<acc_t> smem[cuda::kWarpSize];
  __shared__ Affine<acc_t> affine;
  for (int64_t c = blockIdx.x; c < g.C; c += gridDim.x) {
    Welford<acc_t> w = thread_plane_moments<T, V>(x, g, c, 0, g.units, channel_shift(x, c * g.L));
    w = cuda::block_reduce(w, Welford<acc_t>{0, 0, 0}, smem);
    if (threadIdx.x == 0) affine = epilogue(c, w);
    __syncthreads();
    normalise_plane_range<T, V>(x, y, g, c, 0, g.units, affine);
    __syncthreads();  // smem and affine are reused by the next channel
  }
}

#define DLEXT_BN_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

}  // namespace

// ------------------------------------------------------------------------------ entry points

void stats(const at::Tensor& x, const Layout& g, const at::Tensor& mean, const at::Tensor& var) {
  DLEXT_BN_DISPATCH(x.scalar_type(), "dlext::batch_norm_stats", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    const T* px = x.const_data_ptr<T>();
    with_pack_size<T>(can_pack(g, cuda::kVec16<T>, {px}), [&](auto v) {
      at::Tensor holder;
      Welford<acc_t>* parts;
      const int64_t nparts = launch_stats<T, decltype(v)::value>(px, g, holder, x, parts);
      launch_channel_kernel(parts, nparts, g.C,
                            StatsOut<T>{px, g.rows ? 1 : g.L, mean.mutable_data_ptr<acc_t>(),
                                        var.mutable_data_ptr<acc_t>()});
    });
  });
}

void forward_train(const at::Tensor& x, const Layout& g, const OptTensor& weight,
                   const OptTensor& bias, const OptTensor& running_mean,
                   const OptTensor& running_var, double momentum, double eps,
                   const at::Tensor& out, const at::Tensor& save_mean,
                   const at::Tensor& save_invstd) {
  DLEXT_BN_DISPATCH(x.scalar_type(), "dlext::batch_norm", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    const T* px = x.const_data_ptr<T>();
    T* py = out.mutable_data_ptr<T>();
    TrainForward<T> epilogue{px, g.rows ? 1 : g.L, channel_ref(weight), channel_ref(bias),
                             channel_ref(running_mean, true), channel_ref(running_var, true),
                             momentum, eps, save_mean.mutable_data_ptr<acc_t>(),
                             save_invstd.mutable_data_ptr<acc_t>(), nullptr};
    with_pack_size<T>(can_pack(g, cuda::kVec16<T>, {px, py}), [&](auto v) {
      constexpr int V = decltype(v)::value;
      if (!g.rows && g.count() > 0) {
        const Planes pl = plan_planes(g, V);
        if (pl.splits == 1) {  // one block per channel: everything in one launch
          forward_train_fused_kernel<T, V><<<task_grid(g.C), kThreads, 0,
                                             cuda::current_stream()>>>(px, py, pl, epilogue);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      at::Tensor holder, table_holder;
      Welford<acc_t>* parts;
      const int64_t nparts = launch_stats<T, V>(px, g, holder, x, parts);
      epilogue.table = workspace<Affine<acc_t>>(table_holder, x, g.C);
      launch_channel_kernel(parts, nparts, g.C, epilogue);
      launch_normalise<T, V>(px, py, g, epilogue.table);
    });
  });
}

void forward_eval(const at::Tensor& x, const Layout& g, const OptTensor& weight,
                  const OptTensor& bias, const at::Tensor& running_mean,
                  const at::Tensor& running_var, double eps, const at::Tensor& out,
                  const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  DLEXT_BN_DISPATCH(x.scalar_type(), "dlext::batch_norm", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    const T* px = x.const_data_ptr<T>();
    T* py = out.mutable_data_ptr<T>();
    at::Tensor table_holder;
    Affine<acc_t>* table = workspace<Affine<acc_t>>(table_holder, x, g.C);
    launch_channel_kernel(static_cast<const Welford<acc_t>*>(nullptr), 0, g.C,
                          EvalForward<acc_t>{channel_ref(weight), channel_ref(bias),
                                             channel_ref(running_mean), channel_ref(running_var),
                                             eps, save_mean.mutable_data_ptr<acc_t>(),
                                             save_invstd.mutable_data_ptr<acc_t>(), table});
    with_pack_size<T>(can_pack(g, cuda::kVec16<T>, {px, py}), [&](auto v) {
      launch_normalise<T, decltype(v)::value>(px, py, g, table);
    });
  });
}

void elemt(const at::Tensor& x, const Layout& g, const OptTensor& weight, const OptTensor& bias,
           const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& out) {
  DLEXT_BN_DISPATCH(x.scalar_type(), "dlext::batch_norm_elemt", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    const T* px = x.const_data_ptr<T>();
    T* py = out.mutable_data_ptr<T>();
    at::Tensor table_holder;
    Affine<acc_t>* table = workspace<Affine<acc_t>>(table_holder, x, g.C);
    launch_channel_kernel(static_cast<const Welford<acc_t>*>(nullptr), 0, g.C,
                          ElemtForward<acc_t>{channel_ref(weight), channel_ref(bias),
                                              channel_ref(mean), channel_ref(invstd), table});
    with_pack_size<T>(can_pack(g, cuda::kVec16<T>, {px, py}), [&](auto v) {
      launch_normalise<T, decltype(v)::value>(px, py, g, table);
    });
  });
}

#undef DLEXT_BN_DISPATCH

}  // namespace bn_cuda
}  // namespace dlext
