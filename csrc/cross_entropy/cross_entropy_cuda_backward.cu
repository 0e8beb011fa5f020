// Cross-entropy backward on CUDA: grad_input (and, for class probabilities, grad_target and
// grad_weight) from the logits and the forward's saved log-sum-exp, in one pass that reads each
// logit once and writes each gradient element once. Building blocks:
// cross_entropy_cuda_kernels.cuh.
//
// Per row, with p_c = exp((x_c - max) - log_sum) and s the row's scale (grad_output for 'none',
// grad_output / total_weight for 'mean', grad_output for 'sum'):
//   class indices:  g_c = p_c * sA - sB * w_c - [c == t] * sT
//                   sA = s (a w_t + b sum_c w_c), sB = s b, sT = s a w_t   (ignored rows: p_c * 0)
//   probabilities:  g_c = p_c * s Y - s w_c y'_c,  Y = sum_c w_c y'_c  (one more pass over y)
//                   grad_target_c = s a w_c ((max - x_c) + log_sum)
//   grad_weight_c = sum over rows of s y'_c ((max - x_c) + log_sum)  (two-stage, fixed order)
// the CPU kernels' formulas, in the same order. NaN rows (a max that is not finite) stay NaN
// through log_sum - log_sum added to the scale, as on the CPU.
//
// Why it is fast. Memory-bound: 16-byte packs in and out with kUnroll in flight per thread; the
// per-row scalars come from the target, the saved lse and grad_output, so rows of class indices
// need no reduction and a long row is cut over several blocks when the batch is small.
#include <ATen/Dispatch.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "cross_entropy/cross_entropy_cuda.h"
#include "cross_entropy/cross_entropy_cuda_kernels.cuh"

namespace dlext {
namespace ce_cuda {
namespace {

template <typename T>
struct BwdArgs {
  using acc_t = acc_type<T>;
  // grad_output: per row (go[n * go_sn + d * go_sd], strides may be 0), or go[0] for every row,
  // divided by *total_weight for 'mean'.
  const T* go;
  int64_t go_sn, go_sd;
  bool per_row, mean;
  const acc_t* total_weight;
  T* gx;  // grad_input, or nullptr
  T* gy;  // grad_target, or nullptr
  int64_t g_sn, g_sc, g_sd;
  int64_t splits;  // blocks per long row

  __device__ __forceinline__ acc_t scale(int64_t n, int64_t d) const {
    if (per_row) return static_cast<acc_t>(go[n * go_sn + d * go_sd]);
    const acc_t g = static_cast<acc_t>(go[0]);
    return mean ? g / *total_weight : g;
  }
};

// The per-row scalars of a class-index row (see the top); t = -1 where no class takes sT.
template <typename acc_t>
struct IndexCoef {
  acc_t sA, sB, sT;
  int64_t t;
};

template <typename T>
__device__ __forceinline__ IndexCoef<acc_type<T>> index_coef(const Args<T>& A,
                                                            const BwdArgs<T>& B, int64_t r,
                                                            int64_t n, int64_t d,
                                                            acc_type<T> log_sum, bool report) {
  using acc_t = acc_type<T>;
  IndexCoef<acc_t> co{0, 0, 0, -1};
  const int64_t t = A.target(n, d);
  if (t != A.ignore_index) {
    if (t < 0 || t >= A.C) {
      if (report) A.report_bad(r);
      co.sA = quiet_nan<acc_t>();
    } else {
      const acc_t s = B.scale(n, d), wt = A.wc(t);
      co.sA = s * (A.smooth ? A.a * wt + A.b * A.weight_sum() : wt);
      co.sB = A.smooth ? s * A.b : acc_t(0);
      co.sT = s * (A.smooth ? A.a : acc_t(1)) * wt;
      co.t = t;
    }
  }
  co.sA += log_sum - log_sum;  // NaN for a row that is not all finite
  return co;
}

// Gradient of this thread's share of a class-index row.
template <typename T, int V>
__device__ __forceinline__ void index_row(const Args<T>& A, const BwdArgs<T>& B, const T* xr,
                                          T* gr, acc_type<T> M, acc_type<T> L,
                                          const IndexCoef<acc_type<T>>& co, const RowSpan& sp,
                                          int64_t p0, int64_t p1, bool head, bool tail,
                                          int64_t lane, int64_t G) {
  using acc_t = acc_type<T>;
  walk_row<V>(sp, A.C, p0, p1, head, tail, lane, G,
              [&](auto w_, auto k_, const int64_t* cls, int n) {
    constexpr int W = decltype(w_)::value, K = decltype(k_)::value;
    acc_t v[K][W];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < n) load_vals<T, W>(xr, cls[k], A.x_sc, v[k]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < n) {
        acc_t g[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const int64_t c = cls[k] + j;
          g[j] = ce_exp((v[k][j] - M) - L) * co.sA;
          if (A.smooth) g[j] -= co.sB * A.wc(c);
          if (c == co.t) g[j] -= co.sT;
        }
        store_vals<T, W>(gr, cls[k], B.g_sc, g);
      }
    }
  });
}

// This thread's share of Y = sum_c w_c y'_c of a probability row.
template <typename T, int V>
__device__ __forceinline__ acc_type<T> prob_row_Y(const Args<T>& A, const T* yr, const RowSpan& sp,
                                                  int64_t lane, int64_t G) {
  using acc_t = acc_type<T>;
  acc_t Y = 0;
  walk_row<V>(sp, A.C, 0, sp.P, true, true, lane, G,
              [&](auto w_, auto k_, const int64_t* cls, int n) {
    constexpr int W = decltype(w_)::value, K = decltype(k_)::value;
    acc_t yv[K][W];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < n) load_vals<T, W>(yr, cls[k], A.y_sc, yv[k]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        if (k < n) Y += (A.a * yv[k][j] + A.b) * A.wc(cls[k] + j);
      }
    }
  });
  return Y;
}

// Gradients of this thread's share of a probability row; sY = s * Y + (L - L).
template <typename T, int V>
__device__ __forceinline__ void prob_row(const Args<T>& A, const BwdArgs<T>& B, const T* xr,
                                         const T* yr, int64_t goff, acc_type<T> s, acc_type<T> M,
                                         acc_type<T> L, acc_type<T> sY, const RowSpan& sp,
                                         int64_t lane, int64_t G) {
  using acc_t = acc_type<T>;
  const acc_t sa = s * A.a;
  walk_row<V>(sp, A.C, 0, sp.P, true, true, lane, G,
              [&](auto w_, auto k_, const int64_t* cls, int n) {
    constexpr int W = decltype(w_)::value, K = decltype(k_)::value;
    acc_t v[K][W], yv[K][W];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < n) {
        load_vals<T, W>(xr, cls[k], A.x_sc, v[k]);
        if (B.gx) load_vals<T, W>(yr, cls[k], A.y_sc, yv[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < n) {
        acc_t g[W];
        if (B.gx) {
#pragma unroll
          for (int j = 0; j < W; ++j) {
            const acc_t wy = (A.a * yv[k][j] + A.b) * A.wc(cls[k] + j);
            g[j] = ce_exp((v[k][j] - M) - L) * sY - s * wy;
          }
          store_vals<T, W>(B.gx + goff, cls[k], B.g_sc, g);
        }
        if (B.gy) {
#pragma unroll
          for (int j = 0; j < W; ++j) {
            const acc_t f = A.w ? sa * A.w[cls[k] + j] : sa;
            g[j] = f * ((M - v[k][j]) + L);
          }
          store_vals<T, W>(B.gy + goff, cls[k], B.g_sc, g);
        }
      }
    }
  });
}

// Rows of up to kLongRowUnits packs: G lanes per row, as forward_rows_kernel.
template <typename T, int V, int G, bool kProb>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(Args<T> A, BwdArgs<T> B, int64_t rows_per_block) {
  using acc_t = acc_type<T>;
  const int64_t lane = threadIdx.x % G;
  const int64_t R = A.N * A.D;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = std::min(R, r0 + rows_per_block);
  for (int64_t base = r0; base < r1; base += blockDim.x / G) {  // uniform over the block
    const int64_t r = base + threadIdx.x / G;
    const bool valid = r < r1;
    const int64_t n = valid ? r / A.D : 0, d = valid ? r - n * A.D : 0;
    const T* xr = A.x + n * A.x_sn + d * A.x_sd;
    const int64_t goff = n * B.g_sn + d * B.g_sd;
    const acc_t M = valid ? A.lse_max[r] : acc_t(0), L = valid ? A.lse_log_sum[r] : acc_t(0);
    const RowSpan sp = row_span<T, V>(xr, A.C);
    if constexpr (kProb) {
      const T* yr = A.y + n * A.y_sn + d * A.y_sd;
      const acc_t s = valid ? B.scale(n, d) : acc_t(0);
      acc_t sY = 0;
      if (B.gx) {  // uniform: every lane of the warp takes part in the sum
        const acc_t Y = group_allsum<G>(valid ? prob_row_Y<T, V>(A, yr, sp, lane, G) : acc_t(0));
        sY = s * Y + (L - L);
      }
      if (valid) prob_row<T, V>(A, B, xr, yr, goff, s, M, L, sY, sp, lane, G);
    } else if (valid) {
      const IndexCoef<acc_t> co = index_coef(A, B, r, n, d, L, lane == 0);
      index_row<T, V>(A, B, xr, B.gx + goff, M, L, co, sp, 0, sp.P, true, true, lane, G);
    }
  }
}

// Long rows: task (r, k) is chunk k of row r for one block (class indices; probabilities take
// one chunk per row, whose Y the block sums first).
template <typename T, int V, bool kProb>
__global__ void __launch_bounds__(kThreads) backward_long_rows_kernel(Args<T> A, BwdArgs<T> B) {
  using acc_t = acc_type<T>;
  __shared__ Sum<acc_t> smem[cuda::kWarpSize];
  __shared__ acc_t s_Y;
  const int64_t splits = B.splits, tasks = A.N * A.D * splits;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {
    const int64_t r = task / splits, k = task - r * splits;
    const int64_t n = r / A.D, d = r - n * A.D;
    const T* xr = A.x + n * A.x_sn + d * A.x_sd;
    const int64_t goff = n * B.g_sn + d * B.g_sd;
    const acc_t M = A.lse_max[r], L = A.lse_log_sum[r];
    const RowSpan sp = row_span<T, V>(xr, A.C);
    if constexpr (kProb) {
      const T* yr = A.y + n * A.y_sn + d * A.y_sd;
      const acc_t s = B.scale(n, d);
      acc_t sY = 0;
      if (B.gx) {
        const Sum<acc_t> Y = cuda::block_reduce(
            Sum<acc_t>{prob_row_Y<T, V>(A, yr, sp, threadIdx.x, blockDim.x)}, Sum<acc_t>{0},
            smem);
        if (threadIdx.x == 0) s_Y = Y.v;
        __syncthreads();
        sY = s * s_Y + (L - L);
      }
      prob_row<T, V>(A, B, xr, yr, goff, s, M, L, sY, sp, threadIdx.x, blockDim.x);
      __syncthreads();  // smem and s_Y are reused by the next task
    } else {
      const IndexCoef<acc_t> co = index_coef(A, B, r, n, d, L, threadIdx.x == 0 && k == 0);
      index_row<T, V>(A, B, xr, B.gx + goff, M, L, co, sp, k * sp.P / splits,
                      (k + 1) * sp.P / splits, k == 0, k == splits - 1, threadIdx.x, blockDim.x);
    }
  }
}

// grad_weight (probabilities), stage one: part[k * C + c] = the sum over the rows of chunk k
// (rows [k * R / chunks, (k + 1) * R / chunks), in order) of s * y'_c * ((max - x_c) + log_sum).
// A thread per class, so neighbouring threads read neighbouring classes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    weight_grad_parts_kernel(Args<T> A, BwdArgs<T> B, int64_t chunks,
                             acc_type<T>* __restrict__ part) {
  using acc_t = acc_type<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= A.C) return;
  const int64_t R = A.N * A.D, k = blockIdx.y;
  acc_t sum = 0;
  for (int64_t r = k * R / chunks; r < (k + 1) * R / chunks; ++r) {
    const int64_t n = r / A.D, d = r - n * A.D;
    const acc_t x = static_cast<acc_t>(A.x[n * A.x_sn + c * A.x_sc + d * A.x_sd]);
    const acc_t y = static_cast<acc_t>(A.y[n * A.y_sn + c * A.y_sc + d * A.y_sd]);
    sum += B.scale(n, d) * (A.a * y + A.b) * ((A.lse_max[r] - x) + A.lse_log_sum[r]);
  }
  part[k * A.C + c] = sum;
}

// Stage two: gw[c] = the chunks' sums in chunk order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    weight_grad_finish_kernel(const acc_type<T>* __restrict__ part, int64_t chunks, int64_t C,
                              T* __restrict__ gw) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_type<T> sum = 0;
  for (int64_t k = 0; k < chunks; ++k) sum += part[k * C + c];
  gw[c] = static_cast<T>(sum);
}

template <typename T, bool kProb>
void launch_backward(const Args<T>& A, BwdArgs<T> B) {
  const int64_t R = A.N * A.D;
  constexpr int vec = cuda::kVec16<T>;
  const T* g_any = B.gx ? B.gx : B.gy;
  // Packs where classes are contiguous in every tensor walked and rows share their phase.
  bool packed = A.C >= 2 * vec && A.x_sc == 1 && B.g_sc == 1 &&
                same_phase(A.x, A.x_sn, A.x_sd, g_any, B.g_sn, B.g_sd, A.N, A.D, sizeof(T));
  if (kProb && B.gx) {
    packed = packed && A.y_sc == 1 &&
             same_phase(A.x, A.x_sn, A.x_sd, A.y, A.y_sn, A.y_sd, A.N, A.D, sizeof(T));
  }
  const bool lanes =
      A.x_sc != 1 && A.C > 1 && R >= kLanesMinRows && rows_adjacent(A.D, A.x_sn, A.x_sd);
  const Plan plan = plan_rows(R, A.C, vec, packed, lanes, !kProb);
  B.splits = plan.splits;
  const cudaStream_t stream = cuda::current_stream();
  with_pack<T>(plan.packed, [&](auto v_) {
    constexpr int V = decltype(v_)::value;
    if (plan.long_rows) {
      backward_long_rows_kernel<T, V, kProb>
          <<<static_cast<unsigned>(plan.grid), kThreads, 0, stream>>>(A, B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    with_team(plan.G, [&](auto g_) {
      backward_rows_kernel<T, V, decltype(g_)::value, kProb>
          <<<static_cast<unsigned>(plan.grid), kThreads, 0, stream>>>(A, B,
                                                                      plan.rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename T>
void launch_weight_grad(const Args<T>& A, const BwdArgs<T>& B, const at::Tensor& gw) {
  using acc_t = acc_type<T>;
  const int64_t R = A.N * A.D;
  const int64_t chunks = std::min<int64_t>(256, (R + 63) / 64);
  const at::Tensor part =
      at::empty({chunks, A.C}, gw.options().dtype(at::toOpMathType(gw.scalar_type())));
  const unsigned tiles = static_cast<unsigned>((A.C + kThreads - 1) / kThreads);
  const cudaStream_t stream = cuda::current_stream();
  const dim3 grid(tiles, static_cast<unsigned>(chunks));
  weight_grad_parts_kernel<T><<<grid, kThreads, 0, stream>>>(A, B, chunks,
                                                             part.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  weight_grad_finish_kernel<T><<<tiles, kThreads, 0, stream>>>(part.const_data_ptr<acc_t>(),
                                                               chunks, A.C,
                                                               gw.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void backward(const Inputs& in, int64_t reduction, const at::Tensor& grad_output,
              const at::Tensor& lse, const at::Tensor& total_weight, const at::Tensor& gx,
              const at::Tensor& gy, const at::Tensor& gw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(),
                                  "dlext::cross_entropy_backward", [&] {
    using T = scalar_t;
    using acc_t = acc_type<T>;
    at::Tensor w_sum;
    // Read only here; Args holds the forward's mutable pointers.
    const Args<T> A =
        make_args<T>(in, const_cast<acc_t*>(lse.const_data_ptr<acc_t>()), w_sum);

    BwdArgs<T> B{};
    B.go = grad_output.const_data_ptr<T>();
    B.per_row = reduction == at::Reduction::None;
    if (B.per_row) {
      B.go_sn = grad_output.stride(0);
      B.go_sd = grad_output.stride(1);
    }
    B.mean = reduction == at::Reduction::Mean;
    B.total_weight = total_weight.const_data_ptr<acc_t>();
    const at::Tensor& g_any = gx.defined() ? gx : gy;
    if (g_any.defined()) {
      B.gx = gx.defined() ? gx.mutable_data_ptr<T>() : nullptr;
      B.gy = gy.defined() ? gy.mutable_data_ptr<T>() : nullptr;
      B.g_sn = g_any.stride(0);
      B.g_sc = g_any.stride(1);
      B.g_sd = g_any.stride(2);
    }
    if (in.t.defined()) {
      if (B.gx) launch_backward<T, false>(A, B);
    } else {
      if (g_any.defined()) launch_backward<T, true>(A, B);
      if (gw.defined()) launch_weight_grad<T>(A, B, gw);
    }
  });
}

}  // namespace ce_cuda
}  // namespace dlext
