// Building blocks of the BatchNorm CUDA kernels (batch_norm_cuda_forward.cu, _backward.cu): how
// the work is cut, how a thread walks its part, per-channel parameters of any dtype, and the
// per-channel kernel that finishes every reduction.
//
// The input is dense, seen as (N, C, L) in one of two layouts (bn_cuda::Layout):
//   planes  N C L contiguous: channel c is N planes of L contiguous values. A block reduces or
//           transforms a slice of one channel (a range of its N * L values in (n, l) order),
//           with consecutive threads on consecutive values; a channel has `splits` blocks, so a
//           layer with few channels still fills the GPU.
//   rows    channels innermost: M = N * L rows of C values. A block is a tile of channels (the
//           threads' x, coalesced along the row) times a range of rows (the threads' y).
// Values move in packs of V (16 bytes: 4 floats, 8 halves, 2 doubles) when every tensor involved
// is 16-byte aligned and the run a pack must not cross (L for planes, C for rows) is a multiple
// of V; else one value at a time (V = 1). Each thread keeps kUnroll packs in flight.
//
// Reductions are two-stage and deterministic: each block writes one partial per channel to a
// workspace (partial s of channel c at [s * C + c]), and channel_kernel merges a channel's
// partials in a fixed order (one warp per channel) and hands the result to an epilogue that
// writes the operator's per-channel outputs and the coefficients of the elementwise pass. Where
// one block covers a whole channel, the fused kernels do all three steps in one launch.
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
#include <initializer_list>
#include <optional>
#include <type_traits>

#include "batch_norm/batch_norm_cuda.h"
#include "common/cuda_launch.cuh"
#include "common/cuda_reduce.cuh"

namespace dlext {
namespace bn_cuda {

template <typename T>
using acc_type = at::opmath_type<T>;

using cuda::SumPair;
using cuda::Welford;

// Threads per block of every kernel: small enough that a few blocks (most kernels need 60-128
// registers) share an SM, so one block's serial steps (a block reduction, an epilogue) overlap
// with the others' streaming.
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // packs in flight per thread

// ------------------------------------------------------------------- per-channel parameters

// One value per channel of a tensor of any allowed dtype and any stride, or none (`fill` then).
struct ChannelRef {
  enum Kind : int { kNone, kFloat, kDouble, kHalf, kBFloat16 };
  void* ptr = nullptr;
  int64_t stride = 0;
  Kind kind = kNone;

  __device__ __forceinline__ bool defined() const { return kind != kNone; }

  template <typename V>
  __device__ __forceinline__ V get(int64_t c, V fill) const {
    const int64_t i = c * stride;
    switch (kind) {
      case kFloat: return static_cast<V>(static_cast<const float*>(ptr)[i]);
      case kDouble: return static_cast<V>(static_cast<const double*>(ptr)[i]);
      case kHalf: return static_cast<V>(static_cast<float>(static_cast<const c10::Half*>(ptr)[i]));
      case kBFloat16:
        return static_cast<V>(static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[i]));
      default: return fill;
    }
  }

  // Rounds like the CPU kernels' static_cast<scalar_t>: a 16-bit value through float.
  template <typename V>
  __device__ __forceinline__ void set(int64_t c, V v) const {
    const int64_t i = c * stride;
    switch (kind) {
      case kFloat: static_cast<float*>(ptr)[i] = static_cast<float>(v); break;
      case kDouble: static_cast<double*>(ptr)[i] = static_cast<double>(v); break;
      case kHalf: static_cast<c10::Half*>(ptr)[i] = c10::Half(static_cast<float>(v)); break;
      case kBFloat16:
        static_cast<c10::BFloat16*>(ptr)[i] = c10::BFloat16(static_cast<float>(v));
        break;
      default: break;
    }
  }
};

// A per-channel tensor (1-D) the kernels read; `writable` for one they write.
inline ChannelRef channel_ref(const at::Tensor& t, bool writable = false) {
  ChannelRef r;
  if (!t.defined()) return r;
  switch (t.scalar_type()) {
    case at::kFloat: r.kind = ChannelRef::kFloat; break;
    case at::kDouble: r.kind = ChannelRef::kDouble; break;
    case at::kHalf: r.kind = ChannelRef::kHalf; break;
    case at::kBFloat16: r.kind = ChannelRef::kBFloat16; break;
    default:
      TORCH_CHECK(false, "dlext::batch_norm: unexpected per-channel dtype ", t.scalar_type());
  }
  TORCH_INTERNAL_ASSERT(t.dim() == 1);
  r.ptr = writable ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
  r.stride = t.stride(0);
  return r;
}

inline ChannelRef channel_ref(const OptTensor& t, bool writable = false) {
  return t.has_value() ? channel_ref(*t, writable) : ChannelRef{};
}

// ------------------------------------------------------------------------------ coefficients

// y = (x - mean) * scale + shift
template <typename acc_t>
struct Affine {
  acc_t mean, scale, shift;
};

// training: dx = (dy - mean_dy - (x - mean) * k) * a; evaluation: dx = dy * a
template <typename acc_t>
struct GradCoeffs {
  acc_t mean, mean_dy, k, a;
};

// The reference value the moments of a channel are taken relative to: its first value (at
// `index`), or 0 when that is not finite. Shifting keeps the digits of data far from 0 (mean
// 1e4, spread 1e-2): x - shift is exact there. The CPU kernels use the same value.
template <typename T>
__device__ __forceinline__ acc_type<T> channel_shift(const T* x, int64_t index) {
  const acc_type<T> v = static_cast<acc_type<T>>(x[index]);
  return isfinite(v) ? v : acc_type<T>(0);
}

// torch's training invstd: 1 / sqrt(var + eps) in double, 0 when var == eps == 0.
template <typename acc_t>
__device__ __forceinline__ acc_t train_invstd(acc_t var, double eps) {
  if (var == acc_t(0) && eps == 0) return acc_t(0);
  return static_cast<acc_t>(1.0 / ::sqrt(static_cast<double>(var) + eps));
}

// running = momentum * batch + (1 - momentum) * running, in double as torch does.
__device__ __forceinline__ void update_running(const ChannelRef& running, int64_t c, double batch,
                                               double momentum) {
  if (running.defined()) {
    running.set(c, momentum * batch + (1 - momentum) * running.get<double>(c, 0.0));
  }
}

// ---------------------------------------------------------------------------- packed access

template <typename T, int V>
using Pack = cuda::Pack<T, V>;

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* base, int64_t i) {
  return reinterpret_cast<const Pack<T, V>*>(base)[i];
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* base, int64_t i, const Pack<T, V>& p) {
  reinterpret_cast<Pack<T, V>*>(base)[i] = p;
}

// ------------------------------------------------------------------------- planes: geometry

// Planes in packs: channel c's packs are u = n * Lv + l (n < N, l < Lv), at pack offset
// (n * C + c) * Lv + l. Block task (c, s) covers packs [s * units / splits,
// (s + 1) * units / splits).
struct Planes {
  int64_t C;       // channels
  int64_t L;       // values per plane (a channel's first value is at c * L)
  int64_t Lv;      // packs per plane, L / V
  int64_t units;   // packs per channel, N * Lv
  int64_t splits;  // blocks per channel

  __device__ __forceinline__ void range(int64_t s, int64_t& begin, int64_t& end) const {
    begin = s * units / splits;
    end = (s + 1) * units / splits;
  }
};

// Blocks of kThreads that keep every SM busy with a few resident blocks each.
inline int64_t target_blocks() { return static_cast<int64_t>(cuda::sm_count()) * 4; }

inline Planes plan_planes(const Layout& g, int V) {
  Planes p;
  p.C = g.C;
  p.L = g.L;
  p.Lv = g.L / V;
  p.units = g.N * p.Lv;
  // Enough blocks per channel to fill the GPU, but at least two batches of packs per thread.
  const int64_t by_work = std::max<int64_t>(1, p.units / (kThreads * kUnroll * 2));
  p.splits = std::max<int64_t>(1, std::min(target_blocks() / std::max<int64_t>(1, g.C), by_work));
  return p;
}

// Grid of a kernel whose blocks loop over `tasks` block tasks.
inline unsigned task_grid(int64_t tasks) {
  return static_cast<unsigned>(std::min<int64_t>(tasks, INT_MAX));
}

// The packs of [begin, end) of channel c that thread threadIdx.x of a 1-D block owns (packs
// begin + threadIdx.x + i * blockDim.x), kUnroll at a time: body(off, valid) with the pack
// offsets off[k] of the batch's slots k < valid. Consecutive threads read consecutive packs of a
// plane. Each slot keeps its (n, l) position and steps it by a fixed (dn, dl) with one carry,
// so the loop divides only once per slot.
template <typename Body>
__device__ __forceinline__ void for_each_plane_batch(const Planes& g, int64_t c, int64_t begin,
                                                     int64_t end, const Body& body) {
  const int64_t B = blockDim.x;
  const int64_t step = B * kUnroll;
  const int64_t dn = step / g.Lv, dl = step % g.Lv;
  int64_t n[kUnroll], l[kUnroll];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const int64_t u = begin + threadIdx.x + k * B;
    n[k] = u / g.Lv;
    l[k] = u % g.Lv;
  }
  for (int64_t u = begin + threadIdx.x; u < end; u += step) {
    int64_t off[kUnroll];
    int valid = 0;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      off[k] = (n[k] * g.C + c) * g.Lv + l[k];
      valid += u + k * B < end ? 1 : 0;
      l[k] += dl;
      n[k] += dn;
      if (l[k] >= g.Lv) {
        l[k] -= g.Lv;
        ++n[k];
      }
    }
    body(off, valid);
  }
}

// ---------------------------------------------------------------------------- rows: geometry

// Rows in packs: row r's packs are at r * Cv + p (p < Cv), pack p holding channels p * V + j.
// Block (tile, s) with threads (x, y): pack p = tile * blockDim.x + x, rows
// [s * M / splits, (s+1) * M / splits) with stride blockDim.y from y.
struct Rows {
  int64_t M;       // rows, N * L
  int64_t C;       // channels
  int64_t Cv;      // packs per row, C / V
  int64_t splits;  // blocks along the rows (gridDim.y)

  __device__ __forceinline__ void range(int64_t s, int64_t& begin, int64_t& end) const {
    begin = s * M / splits;
    end = (s + 1) * M / splits;
  }
};

struct RowsLaunch {
  Rows g;
  dim3 grid, block;
};

inline RowsLaunch plan_rows(const Layout& g, int V) {
  RowsLaunch r;
  r.g.M = g.count();
  r.g.C = g.C;
  r.g.Cv = g.C / V;
  int tx = 1;  // a warp (or the whole row, if shorter) along the channels
  while (tx < cuda::kWarpSize && tx < r.g.Cv) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t tiles = (r.g.Cv + tx - 1) / tx;
  TORCH_CHECK(tiles <= INT_MAX, "dlext::batch_norm: too many channels (", g.C, ")");
  const int64_t by_work = std::max<int64_t>(1, r.g.M / (static_cast<int64_t>(ty) * kUnroll * 2));
  r.g.splits = std::max<int64_t>(
      1, std::min({target_blocks() / tiles, by_work, static_cast<int64_t>(65535)}));
  r.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(r.g.splits));
  r.block = dim3(tx, ty);
  return r;
}

// The rows [begin, end) that thread row threadIdx.y owns (begin + threadIdx.y + i * blockDim.y),
// kUnroll at a time: body(r, ty_stride, valid), the batch's slots being rows r + k * ty_stride
// for k < valid.
template <typename Body>
__device__ __forceinline__ void for_each_row_batch(int64_t begin, int64_t end, const Body& body) {
  const int64_t TY = blockDim.y;
  for (int64_t r = begin + threadIdx.y; r < end; r += TY * kUnroll) {
    int valid = 0;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) valid += r + k * TY < end ? 1 : 0;
    body(r, TY, valid);
  }
}

// ------------------------------------------------------------------------ layout decisions

// Whether every pointer is 16-byte aligned and packs of V never cross a plane (planes) or a row
// (rows).
inline bool can_pack(const Layout& g, int V, std::initializer_list<const void*> ptrs) {
  if ((g.rows ? g.C : g.L) % V != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && !cuda::aligned16(p)) return false;
  }
  return true;
}

// f(std::integral_constant<int, V>) with V = 16 bytes of T when `packed`, else 1.
template <typename T, typename F>
void with_pack_size(bool packed, const F& f) {
  if (packed) {
    f(std::integral_constant<int, cuda::kVec16<T>>());
  } else {
    f(std::integral_constant<int, 1>());
  }
}

// A workspace of `n` values of P on the device of `like`, alive as long as `holder`.
template <typename P>
P* workspace(at::Tensor& holder, const at::Tensor& like, int64_t n) {
  holder = at::empty({n * static_cast<int64_t>(sizeof(P))}, like.options().dtype(at::kByte));
  return reinterpret_cast<P*>(holder.mutable_data_ptr());
}

// ---------------------------------------------------------------------- per-channel finish

// For each channel c: merges partials parts[s * C + c], s < nparts, in a fixed order (lane i of
// the channel's warp takes s = i, i + 32, ... in turn, then the warp's tree), and calls
// epilogue(c, merged) once. nparts may be 0: the epilogue then sees the identity (zeros), which
// is how the elementwise operators prepare their coefficients.
template <typename Part, typename Epilogue>
__global__ void __launch_bounds__(kThreads)
    channel_kernel(const Part* __restrict__ parts, int64_t nparts, int64_t C, Epilogue epilogue) {
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t warps = blockDim.x / cuda::kWarpSize;
  for (int64_t c = blockIdx.x * warps + threadIdx.x / cuda::kWarpSize; c < C;
       c += static_cast<int64_t>(gridDim.x) * warps) {
    Part acc{};
#pragma unroll 4  // several partials' loads in flight before their merges
    for (int64_t s = lane; s < nparts; s += cuda::kWarpSize) {
      acc = cuda::merge(acc, parts[s * C + c]);
    }
    acc = cuda::warp_reduce(acc);
    if (lane == 0) epilogue(c, acc);
  }
}

template <typename Part, typename Epilogue>
void launch_channel_kernel(const Part* parts, int64_t nparts, int64_t C, const Epilogue& epilogue) {
  if (C == 0) return;
  constexpr int64_t warps = kThreads / cuda::kWarpSize;
  const int64_t blocks = std::min<int64_t>((C + warps - 1) / warps,
                                           static_cast<int64_t>(cuda::sm_count()) * 32);
  channel_kernel<Part, Epilogue><<<static_cast<unsigned>(blocks), kThreads, 0,
                                   cuda::current_stream()>>>(parts, nparts, C, epilogue);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace bn_cuda
}  // namespace dlext
