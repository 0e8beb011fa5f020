// Cross-entropy forward on CUDA: per row the log-sum-exp (saved as max and log-sum for the
// backward) and the loss; per block the partial sums of the losses, of the weights of the counted
// targets and their number; one last block merges the partials in a fixed order into the reduced
// loss and the mean's denominator. Building blocks: cross_entropy_cuda_kernels.cuh.
//
// Why it is fast. Memory-bound: the logits are read once (online log-sum-exp, see the .cuh), in
// 16-byte packs with kUnroll of them in flight per thread, by teams sized to the row (8 or 32
// lanes of a warp for up to 512 packs, a block beyond; a long row of a small batch is split over
// several blocks so that every SM streams); rows whose classes are strided but whose neighbours
// are adjacent (NCHW maps) go one thread per row, coalesced along the rows. Nothing of size N x C
// is written: only two values per row and one partial per block.
#include <ATen/Dispatch.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "cross_entropy/cross_entropy_cuda.h"
#include "cross_entropy/cross_entropy_cuda_kernels.cuh"
#include "cross_entropy/cross_entropy_mean.h"

namespace dlext {
namespace ce_cuda {
namespace {

template <typename T>
struct FwdOut {
  using acc_t = acc_type<T>;
  T* loss;                   // per row (reduction 'none'), else nullptr
  Partial<acc_t>* parts;     // one per block of the row kernels
  LseState<acc_t>* chunks;   // split long rows: chunk k of row r at [r * splits + k]
  int64_t splits;
};

// This thread's state over its share of a row (see walk_row): the online log-sum-exp and, for
// smoothing or probabilities, the sums relative to `ref`.
template <typename T, int V, bool kProb>
__device__ __forceinline__ LseState<acc_type<T>> row_state(const Args<T>& A, const T* xr,
                                                           const T* yr, acc_type<T> ref,
                                                           const RowSpan& sp, int64_t p0,
                                                           int64_t p1, bool head, bool tail,
                                                           int64_t lane, int64_t G) {
  using acc_t = acc_type<T>;
  LseState<acc_t> st = lse_empty<acc_t>();
  walk_row<V>(sp, A.C, p0, p1, head, tail, lane, G,
              [&](auto w_, auto k_, const int64_t* cls, int n) {
    constexpr int W = decltype(w_)::value, K = decltype(k_)::value;
    acc_t v[K][W];
    [[maybe_unused]] acc_t yv[kProb ? K : 1][W];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < n) {
        load_vals<T, W>(xr, cls[k], A.x_sc, v[k]);
        if constexpr (kProb) load_vals<T, W>(yr, cls[k], A.y_sc, yv[k]);
      }
    }
    acc_t batch_max = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        if (k < n) batch_max = nan_max(batch_max, v[k][j]);
      }
    }
    const acc_t m = nan_max(st.m, batch_max);
    if (m != st.m) {  // a new max (or NaN): rescale once per batch
      st.s *= ce_exp(st.m - m);
      st.m = m;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        // -inf adds nothing (and would give exp(NaN) while m is -inf).
        if (k < n && v[k][j] > neg_inf<acc_t>()) st.s += ce_exp(v[k][j] - st.m);
      }
    }
    if (kProb || A.smooth) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          if (k < n) {
            const acc_t wc = A.wc(cls[k] + j);
            if constexpr (kProb) {
              const acc_t wy = (A.a * yv[k][j] + A.b) * wc;
              st.A += wy * (ref - v[k][j]);
              st.B += wy;
            } else {
              st.A += wc * (ref - v[k][j]);
            }
          }
        }
      }
    }
  });
  return st;
}

// The end of row r from its merged state: writes the lse parts and (reduction 'none') the loss;
// returns the row's share of the block's partial. Class-index rows whose target is ignore_index
// count for nothing; an out-of-range target is reported and gives NaN (no read at it).
template <typename T, bool kProb>
__device__ __forceinline__ Partial<acc_type<T>> row_end(const Args<T>& A, const FwdOut<T>& out,
                                                        int64_t r, int64_t n, int64_t d,
                                                        const T* xr, acc_type<T> ref,
                                                        const LseState<acc_type<T>>& st) {
  using acc_t = acc_type<T>;
  const acc_t M = st.m;
  const acc_t log_s = ce_log(st.s) + (M - M);  // NaN where the max is not finite
  A.lse_max[r] = M;
  A.lse_log_sum[r] = log_s;
  Partial<acc_t> p{0, 0, 0};
  if constexpr (kProb) {
    p.loss = (st.A + (M - ref) * st.B) + st.B * log_s;  // T + Y log s
    p.count = 1;
  } else {
    const int64_t t = A.target(n, d);
    if (t != A.ignore_index) {
      if (t < 0 || t >= A.C) {
        A.report_bad(r);
        p.loss = quiet_nan<acc_t>();
      } else {
        const acc_t wt = A.wc(t);
        p.loss = wt * ((M - static_cast<acc_t>(xr[t * A.x_sc])) + log_s);
        if (A.smooth) {
          const acc_t ws = A.weight_sum();
          const acc_t S = st.A + (M - ref) * ws;  // sum w_c (M - x_c)
          p.loss = A.a * p.loss + A.b * (S + ws * log_s);
        }
        p.weight = wt;
        p.count = 1;
      }
    }
  }
  if (out.loss) out.loss[r] = static_cast<T>(p.loss);
  return p;
}

// Rows of up to kLongRowUnits packs: G lanes per row, blockDim.x / G rows at a time, the block's
// rows [blockIdx.x * rows_per_block, +rows_per_block). kChunks: the rows' states are the split
// long rows' chunks (lane k merges chunks k, k + G, ... in turn), not the logits.
template <typename T, int V, int G, bool kProb, bool kChunks>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(Args<T> A, FwdOut<T> out, int64_t rows_per_block) {
  using acc_t = acc_type<T>;
  __shared__ Partial<acc_t> smem[cuda::kWarpSize];
  const int64_t lane = threadIdx.x % G, groups = blockDim.x / G;
  const int64_t R = A.N * A.D;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = std::min(R, r0 + rows_per_block);
  const bool need_ref = kProb || A.smooth;
  Partial<acc_t> acc{0, 0, 0};
  for (int64_t base = r0; base < r1; base += groups) {  // uniform over the block
    const int64_t r = base + threadIdx.x / G;
    const bool valid = r < r1;
    const int64_t n = valid ? r / A.D : 0, d = valid ? r - n * A.D : 0;
    const T* xr = A.x + n * A.x_sn + d * A.x_sd;
    const acc_t ref = valid && need_ref ? row_reference(xr) : acc_t(0);
    LseState<acc_t> st = lse_empty<acc_t>();
    if (valid) {
      if constexpr (kChunks) {
        for (int64_t k = lane; k < out.splits; k += G) {
          st = merge(st, out.chunks[r * out.splits + k]);
        }
      } else {
        const T* yr = kProb ? A.y + n * A.y_sn + d * A.y_sd : nullptr;
        const RowSpan sp = row_span<T, V>(xr, A.C);
        st = row_state<T, V, kProb>(A, xr, yr, ref, sp, 0, sp.P, true, true, lane, G);
      }
    }
    st = group_reduce<G>(st);  // every lane of the warp, valid row or not
    if (valid && lane == 0) acc = merge(acc, row_end<T, kProb>(A, out, r, n, d, xr, ref, st));
  }
  acc = cuda::block_reduce(acc, Partial<acc_t>{0, 0, 0}, smem);
  if (threadIdx.x == 0) out.parts[blockIdx.x] = acc;
}

// Long rows: task (r, k) is chunk k of row r's packs, for one block; tasks go round the grid in
// order. One chunk per row: the block ends its rows itself, else it stores the chunk's state for
// forward_rows_kernel<kChunks>.
template <typename T, int V, bool kProb>
__global__ void __launch_bounds__(kThreads) forward_long_rows_kernel(Args<T> A, FwdOut<T> out) {
  using acc_t = acc_type<T>;
  __shared__ LseState<acc_t> smem[cuda::kWarpSize];
  const int64_t splits = out.splits, tasks = A.N * A.D * splits;
  const bool need_ref = kProb || A.smooth;
  Partial<acc_t> acc{0, 0, 0};
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t r = task / splits, k = task - r * splits;
    const int64_t n = r / A.D, d = r - n * A.D;
    const T* xr = A.x + n * A.x_sn + d * A.x_sd;
    const T* yr = kProb ? A.y + n * A.y_sn + d * A.y_sd : nullptr;
    const acc_t ref = need_ref ? row_reference(xr) : acc_t(0);
    const RowSpan sp = row_span<T, V>(xr, A.C);
    LseState<acc_t> st = row_state<T, V, kProb>(A, xr, yr, ref, sp, k * sp.P / splits,
                                                 (k + 1) * sp.P / splits, k == 0,
                                                 k == splits - 1, threadIdx.x, blockDim.x);
    st = cuda::block_reduce(st, lse_empty<acc_t>(), smem);
    if (threadIdx.x == 0) {
      if (splits == 1) {
        acc = merge(acc, row_end<T, kProb>(A, out, r, n, d, xr, ref, st));
      } else {
        out.chunks[task] = st;
      }
    }
    __syncthreads();  // smem is reused by the next task
  }
  if (splits == 1 && threadIdx.x == 0) out.parts[blockIdx.x] = acc;
}

// The reduced loss and the mean's denominator from the row kernels' partials: thread i merges
// partials i, i + kThreads, ... in turn, then the block's tree. by_weight: the denominator is the
// sum of the counted targets' weights, else their number (probabilities: every row).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_finish_kernel(const Partial<acc_type<T>>* __restrict__ parts, int64_t nparts,
                          bool by_weight, int64_t reduction, T* __restrict__ loss,
                          acc_type<T>* __restrict__ total_weight) {
  using acc_t = acc_type<T>;
  __shared__ Partial<acc_t> smem[cuda::kWarpSize];
  Partial<acc_t> p{0, 0, 0};
  for (int64_t i = threadIdx.x; i < nparts; i += blockDim.x) p = merge(p, parts[i]);
  p = cuda::block_reduce(p, Partial<acc_t>{0, 0, 0}, smem);
  if (threadIdx.x == 0) {
    const acc_t tw = by_weight ? p.weight : static_cast<acc_t>(p.count);
    *total_weight = tw;
    if (reduction != at::Reduction::None) {
      *loss = static_cast<T>(reduction == at::Reduction::Mean ? ce_mean(p.loss, tw) : p.loss);
    }
  }
}

template <typename T, bool kProb>
void launch_forward(const Args<T>& A, const Inputs& in, int64_t reduction, const at::Tensor& loss,
                    const at::Tensor& total_weight) {
  using acc_t = acc_type<T>;
  const int64_t R = A.N * A.D;
  constexpr int vec = cuda::kVec16<T>;
  // Packs where classes are contiguous: each row's head absorbs its offset modulo 16 bytes.
  bool packed = A.C >= 2 * vec && A.x_sc == 1;
  if constexpr (kProb) {
    packed = packed && A.y_sc == 1 &&
             same_phase(A.x, A.x_sn, A.x_sd, A.y, A.y_sn, A.y_sd, A.N, A.D, sizeof(T));
  }
  const bool lanes =
      A.x_sc != 1 && A.C > 1 && R >= kLanesMinRows && rows_adjacent(A.D, A.x_sn, A.x_sd);
  const Plan plan = plan_rows(R, A.C, vec, packed, lanes, true);

  FwdOut<T> out{};
  out.loss = reduction == at::Reduction::None ? loss.mutable_data_ptr<T>() : nullptr;
  out.splits = plan.splits;
  at::Tensor parts_holder, chunks_holder;
  auto bytes = [&](int64_t n, size_t size) {
    return at::empty({n * static_cast<int64_t>(size)}, in.x.options().dtype(at::kByte));
  };
  int64_t nparts = plan.grid;
  if (plan.long_rows && plan.splits > 1) {
    chunks_holder = bytes(R * plan.splits, sizeof(LseState<acc_t>));
    out.chunks = reinterpret_cast<LseState<acc_t>*>(chunks_holder.mutable_data_ptr());
    // The second stage: a warp per row merges the row's chunks.
    constexpr int64_t groups = kThreads / 32;
    nparts = (R + groups - 1) / groups;
  }
  parts_holder = bytes(nparts, sizeof(Partial<acc_t>));
  out.parts = reinterpret_cast<Partial<acc_t>*>(parts_holder.mutable_data_ptr());
  const cudaStream_t stream = cuda::current_stream();

  with_pack<T>(plan.packed, [&](auto v_) {
    constexpr int V = decltype(v_)::value;
    if (plan.long_rows) {
      forward_long_rows_kernel<T, V, kProb>
          <<<static_cast<unsigned>(plan.grid), kThreads, 0, stream>>>(A, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.splits > 1) {
        forward_rows_kernel<T, 1, 32, kProb, true>
            <<<static_cast<unsigned>(nparts), kThreads, 0, stream>>>(A, out, kThreads / 32);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    with_team(plan.G, [&](auto g_) {
      forward_rows_kernel<T, V, decltype(g_)::value, kProb, false>
          <<<static_cast<unsigned>(plan.grid), kThreads, 0, stream>>>(A, out,
                                                                      plan.rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  forward_finish_kernel<T><<<1, kThreads, 0, stream>>>(
      out.parts, nparts, !kProb && A.w != nullptr, reduction,
      reduction == at::Reduction::None ? nullptr : loss.mutable_data_ptr<T>(),
      total_weight.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void forward(const Inputs& in, int64_t reduction, const at::Tensor& loss, const at::Tensor& lse,
             const at::Tensor& total_weight) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(),
                                  "dlext::cross_entropy", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    at::Tensor w_sum;
    const Args<T> A = make_args<T>(in, lse.mutable_data_ptr<acc_t>(), w_sum);
    if (in.t.defined()) {
      launch_forward<T, false>(A, in, reduction, loss, total_weight);
    } else {
      launch_forward<T, true>(A, in, reduction, loss, total_weight);
    }
  });
}

}  // namespace ce_cuda
}  // namespace dlext
