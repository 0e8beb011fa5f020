// The implicit-GEMM conv2d kernels (forward, backward-data, backward-weight) for every dtype: one
// templated kernel, instantiated per dtype in conv2d_igemm_{f16,bf16,tf32,fma}_cuda.cu. The GEMM
// view of each pass is in conv2d_cuda.cuh.
//
// What a block does: one BM x BN tile of a group's GEMM, over its slice of the depth in steps of
// BK = 64 bytes (32 halves, 16 floats, 8 doubles). Each step gathers the A and B tiles straight from
// the activations (no im2col buffer): a thread owns fixed tile rows, so the per-row coordinates are
// computed once, and per step only the depth index is split into (r, s, channel). Loads go through
// registers into one of two shared-memory stages while the warps multiply the other stage (one
// __syncthreads per step). Both tiles sit in shared memory as rows of BK depth values with an
// 80-byte pitch, which makes the 16-byte ldmatrix / vector reads below free of bank conflicts.
//
// Why it is fast:
//   - Operands are read as 16-byte vectors along channels (contiguous in NHWC) when the channel
//     counts and pointers allow (`VEC`); otherwise element by element (Cin = 3, odd groups).
//   - Tensor cores: warps compute 64x32 (or 32x32) warp tiles with mma.sync m16n8k16 (float16,
//     bfloat16) or m16n8k8 (TF32, operands rounded to TF32 once, when staged), fed by ldmatrix.x4,
//     with float accumulators in registers.
//   - The FMA variant (float with TF32 off, double, 16-bit types before sm_80) uses the same
//     loaders; each thread computes a 4x4 micro-tile from 16-byte shared-memory reads.
//   - The result is written once, through the strides of the output tensor (NCHW or NHWC), with the
//     bias added; backward-weight writes float partials per depth slice instead (split-K), summed
//     in a fixed order by splitk_reduce_kernel, so every result is deterministic.
// Bounds: depth positions past the end, rows/cols past the group, padding taps, and (backward-data)
// taps whose position does not divide by the stride all read as zero.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_launch.cuh"
#include "conv2d/conv2d_cuda.cuh"

namespace dlext {
namespace conv2d_cuda {
namespace igemm {

constexpr int kTileKBytes = 64;               // BK in bytes
constexpr int kPitch = kTileKBytes + 16;      // shared-memory row pitch in bytes
constexpr int32_t kFar = -(1 << 30);          // a coordinate no tap brings into the image

enum class Math { kTensorCore, kFMA };

template <typename T>
using acc_t = at::opmath_type<T>;  // float for half/bfloat16/float, double for double

// Raw storage of one element: the kernels move bits and convert only to compute.
template <typename T>
using bits_t = std::conditional_t<sizeof(T) == 2, uint16_t,
                                  std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(bits_t<T> b) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<float>(c10::Half(b, c10::Half::from_bits()));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()));
  } else if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(b);
  } else {
    return __longlong_as_double(static_cast<long long>(b));
  }
}

// Block tile BM x BN with THREADS threads; BK and the vector width follow from the dtype.
template <typename T, int BM_, int BN_, int THREADS_>
struct Shape {
  static constexpr int BM = BM_, BN = BN_, THREADS = THREADS_;
  static constexpr int ES = sizeof(T);
  static constexpr int BK = kTileKBytes / ES;
  static constexpr int VEC = 16 / ES;                       // elements per 16-byte vector
  static constexpr int NV_A = BM * (kTileKBytes / 16) / THREADS;  // vectors per thread per tile
  static constexpr int NV_B = BN * (kTileKBytes / 16) / THREADS;
  static constexpr int STAGE = (BM + BN) * kPitch;          // bytes of one shared-memory stage
  static_assert(NV_A * THREADS == BM * 4 && NV_B * THREADS == BN * 4, "tile / thread mismatch");
  static_assert(THREADS % BK == 0 && (BM / VEC) % (THREADS / BK) == 0 &&
                    (BN / VEC) % (THREADS / BK) == 0, "backward-weight loader mapping");
  static_assert(2 * STAGE <= 48 * 1024, "static shared memory");
};

template <typename T>
using Vec = cuda::Pack<bits_t<T>, 16 / sizeof(T)>;

template <typename T>
__device__ __forceinline__ Vec<T> zero_vec() {
  Vec<T> v;
#pragma unroll
  for (int i = 0; i < 16 / static_cast<int>(sizeof(T)); ++i) v.v[i] = 0;
  return v;
}

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const bits_t<T>* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}

// float -> TF32 (round to nearest, ties away), as the bits of a float with 13 low bits clear.
__device__ __forceinline__ uint32_t to_tf32(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(x)));
  return r;
#else
  return x;
#endif
}

// What the staged element becomes in shared memory: TF32 tensor-core operands are rounded once.
template <typename T, Math MATH>
__device__ __forceinline__ bits_t<T> staged(bits_t<T> x) {
  if constexpr (MATH == Math::kTensorCore && std::is_same_v<T, float>) {
    return to_tf32(x);
  } else {
    return x;
  }
}

// ------------------------------------------------------------------------------------- loaders
//
// Forward and backward-data (depth-contiguous operands). The tile's BK depth values per row are
// four 16-byte columns: thread t owns column t % 4 and rows t / 4 + i * THREADS / 4, so both
// operands share one (r, s, channel) split per step.
template <typename T, class Sh, Kind KIND, bool VEC, Math MATH>
struct DepthLoader {
  using B = bits_t<T>;
  static constexpr int V = Sh::VEC;
  static constexpr int ROW_STEP = Sh::THREADS / 4;

  int64_t a_base[Sh::NV_A];  // element offset of the row's image (and group's channels)
  int32_t a_h[Sh::NV_A];     // forward: p*sh - pad_t; backward-data: h + pad_t (kFar: no row)
  int32_t a_w[Sh::NV_A];
  int64_t b_base[Sh::NV_B];  // element offset of the B row, or -1 past the group's columns
  int col;                   // which 16-byte column of the tile this thread fills
  Vec<T> sa[Sh::NV_A], sb[Sh::NV_B];

  __device__ void init(const IGemmArgs& g, int64_t m0, int64_t n0, int grp, int tid) {
    col = tid % 4;
#pragma unroll
    for (int i = 0; i < Sh::NV_A; ++i) {
      const int64_t m = m0 + tid / 4 + i * ROW_STEP;
      a_base[i] = 0;
      a_h[i] = kFar;
      a_w[i] = kFar;
      if (m < g.rows) {
        if constexpr (KIND == Kind::kForward) {
          const int64_t plane = g.Ho * g.Wo;
          const int64_t n = m / plane;
          const int32_t pq = static_cast<int32_t>(m - n * plane);
          const int32_t p = pq / static_cast<int32_t>(g.Wo), q = pq - p * static_cast<int32_t>(g.Wo);
          a_base[i] = n * g.H * g.W * g.C + static_cast<int64_t>(grp) * g.Cg;
          a_h[i] = p * g.stride_h - g.pad_t;
          a_w[i] = q * g.stride_w - g.pad_l;
        } else {
          const int64_t plane = g.H * g.W;
          const int64_t n = m / plane;
          const int32_t hw = static_cast<int32_t>(m - n * plane);
          const int32_t h = hw / static_cast<int32_t>(g.W), w = hw - h * static_cast<int32_t>(g.W);
          a_base[i] = n * g.Ho * g.Wo * g.K + static_cast<int64_t>(grp) * g.Kg;
          a_h[i] = h + g.pad_t;
          a_w[i] = w + g.pad_l;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < Sh::NV_B; ++i) {
      const int64_t j = n0 + tid / 4 + i * ROW_STEP;
      b_base[i] = j < g.cols ? (static_cast<int64_t>(grp) * g.cols + j) * g.depth : -1;
    }
  }

  // Offset of A element (row i, tap r s, channel ch), or -1 where it reads as zero.
  __device__ __forceinline__ int64_t a_offset(const IGemmArgs& g, int i, int32_t r, int32_t s,
                                              int32_t ch) const {
    if constexpr (KIND == Kind::kForward) {
      const int32_t h = a_h[i] + r * g.dil_h, w = a_w[i] + s * g.dil_w;
      if (static_cast<uint32_t>(h) >= static_cast<uint32_t>(g.H) ||
          static_cast<uint32_t>(w) >= static_cast<uint32_t>(g.W)) {
        return -1;
      }
      return a_base[i] + (static_cast<int64_t>(h) * g.W + w) * g.C + ch;
    } else {
      // Output position p reaches input row h through tap r when p * sh = h + pad_t - r * dh.
      const int32_t ph = a_h[i] - r * g.dil_h, pw = a_w[i] - s * g.dil_w;
      if (ph < 0 || pw < 0) return -1;
      const int32_t p = ph / g.stride_h, q = pw / g.stride_w;
      if (p * g.stride_h != ph || q * g.stride_w != pw || p >= g.Ho || q >= g.Wo) return -1;
      return a_base[i] + (static_cast<int64_t>(p) * g.Wo + q) * g.K + ch;
    }
  }

  __device__ void load(const IGemmArgs& g, int64_t k0) {
    const B* pa = static_cast<const B*>(g.a);
    const B* pb = static_cast<const B*>(g.b);
    const int32_t per_tap = KIND == Kind::kForward ? g.Cg : g.Kg;
    int32_t kk = static_cast<int32_t>(k0) + col * V;  // the depth fits in int32 (host check)
    int32_t rs = kk / per_tap;
    int32_t ch = kk - rs * per_tap;
    int32_t r = rs / g.S;
    int32_t s = rs - r * g.S;
    if constexpr (VEC) {  // per_tap and depth are multiples of V: a vector is all in or all out
      const bool in = kk < g.depth;
#pragma unroll
      for (int i = 0; i < Sh::NV_A; ++i) {
        const int64_t off = in ? a_offset(g, i, r, s, ch) : -1;
        sa[i] = off >= 0 ? load_vec<T>(pa + off) : zero_vec<T>();
      }
#pragma unroll
      for (int i = 0; i < Sh::NV_B; ++i) {
        sb[i] = in && b_base[i] >= 0 ? load_vec<T>(pb + b_base[i] + kk) : zero_vec<T>();
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const bool in = kk < g.depth;
#pragma unroll
        for (int i = 0; i < Sh::NV_A; ++i) {
          const int64_t off = in ? a_offset(g, i, r, s, ch) : -1;
          sa[i].v[v] = off >= 0 ? pa[off] : B(0);
        }
#pragma unroll
        for (int i = 0; i < Sh::NV_B; ++i) {
          sb[i].v[v] = in && b_base[i] >= 0 ? pb[b_base[i] + kk] : B(0);
        }
        ++kk;  // next depth position: next channel, wrapping into the next tap
        if (++ch == per_tap) {
          ch = 0;
          if (++s == g.S) {
            s = 0;
            ++r;
          }
        }
      }
    }
  }

  __device__ void store(unsigned char* sm_a, unsigned char* sm_b, int tid) const {
#pragma unroll
    for (int i = 0; i < Sh::NV_A; ++i) put(sm_a + (tid / 4 + i * ROW_STEP) * kPitch + col * 16, sa[i]);
#pragma unroll
    for (int i = 0; i < Sh::NV_B; ++i) put(sm_b + (tid / 4 + i * ROW_STEP) * kPitch + col * 16, sb[i]);
  }

  static __device__ __forceinline__ void put(unsigned char* dst, Vec<T> v) {
#pragma unroll
    for (int e = 0; e < V; ++e) v.v[e] = staged<T, MATH>(v.v[e]);
    *reinterpret_cast<Vec<T>*>(dst) = v;
  }
};

// Backward-weight (operands contiguous along rows, not depth). Thread t owns depth column
// t % BK (one output pixel per step) and the 16-byte row vectors t / BK + i * THREADS / BK; each
// vector is written transposed into the tile's rows. The pixel (n, p, q) is split once per step
// and shared by both operands.
template <typename T, class Sh, bool VEC, Math MATH>
struct PixelLoader {
  using B = bits_t<T>;
  static constexpr int V = Sh::VEC;
  static constexpr int RV_STEP = Sh::THREADS / Sh::BK;

  int kc;                       // depth column (pixel of the step)
  int64_t a_i[Sh::NV_A];        // A: first output channel (in the group) of each vector
  int32_t b_r[Sh::NV_B], b_s[Sh::NV_B], b_c[Sh::NV_B];  // B: (r, s, c) of each vector's start
  int64_t b_j[Sh::NV_B];        // B: its column index j
  int64_t chan_a, chan_b;       // channel offsets of the group in dy and x
  Vec<T> sa[Sh::NV_A], sb[Sh::NV_B];

  __device__ void init(const IGemmArgs& g, int64_t m0, int64_t n0, int grp, int tid) {
    kc = tid % Sh::BK;
    chan_a = static_cast<int64_t>(grp) * g.Kg;
    chan_b = static_cast<int64_t>(grp) * g.Cg;
#pragma unroll
    for (int i = 0; i < Sh::NV_A; ++i) a_i[i] = m0 + (tid / Sh::BK + i * RV_STEP) * V;
#pragma unroll
    for (int i = 0; i < Sh::NV_B; ++i) {
      const int64_t j = n0 + (tid / Sh::BK + i * RV_STEP) * V;
      b_j[i] = j;
      const int32_t jj = j < g.cols ? static_cast<int32_t>(j) : 0;
      const int32_t rs = jj / g.Cg;
      b_c[i] = jj - rs * g.Cg;
      b_r[i] = rs / g.S;
      b_s[i] = rs - b_r[i] * g.S;
    }
  }

  __device__ void load(const IGemmArgs& g, int64_t k0) {
    const B* pa = static_cast<const B*>(g.a);
    const B* pb = static_cast<const B*>(g.b);
    const int64_t pix = k0 + kc;
    const bool in = pix < g.depth;
    const int64_t plane = g.Ho * g.Wo;
    const int64_t n = in ? pix / plane : 0;
    const int32_t pq = static_cast<int32_t>(pix - n * plane);
    const int32_t p = pq / static_cast<int32_t>(g.Wo), q = pq - p * static_cast<int32_t>(g.Wo);
    const int32_t h0 = p * g.stride_h - g.pad_t, w0 = q * g.stride_w - g.pad_l;
    const int64_t a_row = pix * g.K + chan_a;   // dy[pix, group's channels]
    const int64_t b_img = n * g.H * g.W * g.C + chan_b;
#pragma unroll
    for (int i = 0; i < Sh::NV_A; ++i) {
      if constexpr (VEC) {
        sa[i] = in && a_i[i] < g.rows ? load_vec<T>(pa + a_row + a_i[i]) : zero_vec<T>();
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) sa[i].v[v] = in && a_i[i] + v < g.rows ? pa[a_row + a_i[i] + v] : B(0);
      }
    }
#pragma unroll
    for (int i = 0; i < Sh::NV_B; ++i) {
      if constexpr (VEC) {
        const int32_t h = h0 + b_r[i] * g.dil_h, w = w0 + b_s[i] * g.dil_w;
        const bool ok = in && b_j[i] < g.cols &&
                        static_cast<uint32_t>(h) < static_cast<uint32_t>(g.H) &&
                        static_cast<uint32_t>(w) < static_cast<uint32_t>(g.W);
        sb[i] = ok ? load_vec<T>(pb + b_img + (static_cast<int64_t>(h) * g.W + w) * g.C + b_c[i])
                   : zero_vec<T>();
      } else {
        int32_t r = b_r[i], s = b_s[i], c = b_c[i];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int32_t h = h0 + r * g.dil_h, w = w0 + s * g.dil_w;
          const bool ok = in && b_j[i] + v < g.cols &&
                          static_cast<uint32_t>(h) < static_cast<uint32_t>(g.H) &&
                          static_cast<uint32_t>(w) < static_cast<uint32_t>(g.W);
          sb[i].v[v] = ok ? pb[b_img + (static_cast<int64_t>(h) * g.W + w) * g.C + c] : B(0);
          if (++c == g.Cg) {
            c = 0;
            if (++s == g.S) {
              s = 0;
              ++r;
            }
          }
        }
      }
    }
  }

  __device__ void store(unsigned char* sm_a, unsigned char* sm_b, int tid) const {
#pragma unroll
    for (int i = 0; i < Sh::NV_A; ++i) {
      unsigned char* dst = sm_a + ((tid / Sh::BK + i * RV_STEP) * V) * kPitch + kc * Sh::ES;
#pragma unroll
      for (int v = 0; v < V; ++v) *reinterpret_cast<B*>(dst + v * kPitch) = staged<T, MATH>(sa[i].v[v]);
    }
#pragma unroll
    for (int i = 0; i < Sh::NV_B; ++i) {
      unsigned char* dst = sm_b + ((tid / Sh::BK + i * RV_STEP) * V) * kPitch + kc * Sh::ES;
#pragma unroll
      for (int v = 0; v < V; ++v) *reinterpret_cast<B*>(dst + v * kPitch) = staged<T, MATH>(sb[i].v[v]);
    }
  }
};

template <typename T, class Sh, Kind KIND, bool VEC, Math MATH>
using Loader = std::conditional_t<KIND == Kind::kBackwardWeight, PixelLoader<T, Sh, VEC, MATH>,
                                  DepthLoader<T, Sh, KIND, VEC, MATH>>;

// ------------------------------------------------------------------------------------ epilogue
//
// Where GEMM element (row, col) of group grp goes: out + row_offset + col_offset, or for split-K
// partials workspace + row_offset + col (rows past the group give -1).
template <typename T, Kind KIND>
struct Epilogue {
  const IGemmArgs& g;
  int grp, split;
  bool partial;

  __device__ int64_t row_offset(int64_t m) const {
    if (m >= g.rows) return -1;
    if (partial) return ((static_cast<int64_t>(split) * g.groups + grp) * g.rows + m) * g.cols;
    if constexpr (KIND == Kind::kBackwardWeight) {
      return (static_cast<int64_t>(grp) * g.Kg + m) * g.out_stride[0];
    } else {
      const int64_t oh = KIND == Kind::kForward ? g.Ho : g.H;
      const int64_t ow = KIND == Kind::kForward ? g.Wo : g.W;
      const int64_t n = m / (oh * ow);
      const int64_t yx = m - n * oh * ow;
      const int64_t y = yx / ow;
      return n * g.out_stride[0] + y * g.out_stride[2] + (yx - y * ow) * g.out_stride[3];
    }
  }

  __device__ int64_t col_offset(int64_t j) const {
    if (j >= g.cols) return -1;
    if (partial) return j;
    if constexpr (KIND == Kind::kBackwardWeight) {
      const int64_t rs = j / g.Cg, c = j - rs * g.Cg;
      const int64_t r = rs / g.S;
      return c * g.out_stride[1] + r * g.out_stride[2] + (rs - r * g.S) * g.out_stride[3];
    } else {
      return (static_cast<int64_t>(grp) * g.cols + j) * g.out_stride[1];
    }
  }

  __device__ void put(int64_t ro, int64_t co, int64_t j, acc_t<T> v) const {
    if (ro < 0 || co < 0) return;
    if (partial) {
      static_cast<acc_t<T>*>(g.workspace)[ro + co] = v;
      return;
    }
    if constexpr (KIND == Kind::kForward) {
      if (g.bias != nullptr) {
        v += static_cast<acc_t<T>>(static_cast<const T*>(g.bias)[static_cast<int64_t>(grp) * g.cols + j]);
      }
    }
    static_cast<T*>(g.out)[ro + co] = static_cast<T>(v);
  }
};

// ------------------------------------------------------------------------------- tensor cores

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

// d += a * b for one 16x8 tile: m16n8k16 (float16 / bfloat16) or m16n8k8 (TF32).
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// Warps WARPS_M x WARPS_N; each computes a WM x WN warp tile as MI x NI mma tiles of 16 x 8.
// Per 32 bytes of depth (k16 halves, k8 floats), lane l points ldmatrix at:
//   A: row l % 16, byte (l / 16) * 16     -> a0..a3 = rows g / g+8, depth t / t+4 (in 4-byte units)
//   B: row l % 8 + (l / 16) * 8, byte ((l / 8) % 2) * 16  -> b0, b1 of two neighbouring n8 tiles
// which are exactly the mma fragments (g = lane / 4, t = lane % 4): the same byte pattern serves
// 16-bit and TF32 operands.
template <typename T, class Sh, int WARPS_M, int WARPS_N>
struct TensorCoreMath {
  static constexpr int WM = Sh::BM / WARPS_M, WN = Sh::BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(WARPS_M * WARPS_N * 32 == Sh::THREADS && MI >= 1 && NI % 2 == 0, "warp tiling");
  float acc[MI][NI][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  __device__ void step(const unsigned char* sm_a, const unsigned char* sm_b, int tid) {
    const int lane = tid % 32, warp = tid / 32;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const uint32_t a_addr = smem_addr(sm_a + (wm + lane % 16) * kPitch + (lane / 16) * 16);
    const uint32_t b_addr =
        smem_addr(sm_b + (wn + lane % 8 + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 16);
#pragma unroll
    for (int kb = 0; kb < kTileKBytes; kb += 32) {
      uint32_t af[MI][4];
      uint32_t bf[NI][2];
#pragma unroll
      for (int i = 0; i < MI; ++i) ldmatrix_x4(af[i], a_addr + i * 16 * kPitch + kb);
#pragma unroll
      for (int j = 0; j < NI; j += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, b_addr + j * 8 * kPitch + kb);
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) mma<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }

  // c0, c1: row g, cols 2t, 2t+1; c2, c3: row g + 8.
  template <class Epi>
  __device__ void finish(const Epi& epi, int64_t m0, int64_t n0, int tid) const {
    const int lane = tid % 32, warp = tid / 32;
    const int64_t rm = m0 + (warp / WARPS_N) * WM + lane / 4;
    const int64_t cn = n0 + (warp % WARPS_N) * WN + (lane % 4) * 2;
    int64_t co[NI][2];
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) co[j][e] = epi.col_offset(cn + j * 8 + e);
#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t ro = epi.row_offset(rm + i * 16 + h * 8);
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) epi.put(ro, co[j][e], cn + j * 8 + e, acc[i][j][h * 2 + e]);
      }
    }
  }
};

// ----------------------------------------------------------------------------------------- FMA
//
// 256 threads as 16 x 16; thread (tm, tn) computes rows tm + 16 i and cols tn + 16 j (i, j < 4),
// reading 16 bytes of depth per row at a time (8 vector reads per 16 * VEC multiply-adds).
template <typename T, class Sh>
struct FmaMath {
  static_assert(Sh::THREADS == 256 && Sh::BM == 64 && Sh::BN == 64, "FMA tiling");
  using A = acc_t<T>;
  static constexpr int V = Sh::VEC;
  A acc[4][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  }

  __device__ void step(const unsigned char* sm_a, const unsigned char* sm_b, int tid) {
    const int tm = tid / 16, tn = tid % 16;
#pragma unroll
    for (int kb = 0; kb < kTileKBytes; kb += 16) {
      Vec<T> a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = *reinterpret_cast<const Vec<T>*>(sm_a + (tm + 16 * i) * kPitch + kb);
        b[i] = *reinterpret_cast<const Vec<T>*>(sm_b + (tn + 16 * i) * kPitch + kb);
      }
#pragma unroll
      for (int e = 0; e < V; ++e)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(to_acc<T>(a[i].v[e]), to_acc<T>(b[j].v[e]), acc[i][j]);
    }
  }

  template <class Epi>
  __device__ void finish(const Epi& epi, int64_t m0, int64_t n0, int tid) const {
    const int tm = tid / 16, tn = tid % 16;
    int64_t co[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) co[j] = epi.col_offset(n0 + tn + 16 * j);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t ro = epi.row_offset(m0 + tm + 16 * i);
#pragma unroll
      for (int j = 0; j < 4; ++j) epi.put(ro, co[j], n0 + tn + 16 * j, acc[i][j]);
    }
  }
};

// -------------------------------------------------------------------------------------- kernel

template <typename T, Math MATH, class Sh, class Mma, Kind KIND, bool VEC>
__global__ void __launch_bounds__(Sh::THREADS) igemm_kernel(const IGemmArgs g) {
  __shared__ __align__(16) unsigned char smem[2 * Sh::STAGE];
  const int tid = threadIdx.x;
  // Backward-weight puts its (usually longer) column tiles on x, the others their row tiles.
  const bool wgrad = KIND == Kind::kBackwardWeight;
  const int64_t m0 = static_cast<int64_t>(wgrad ? blockIdx.y : blockIdx.x) * Sh::BM;
  const int64_t n0 = static_cast<int64_t>(wgrad ? blockIdx.x : blockIdx.y) * Sh::BN;
  const int split = static_cast<int>(blockIdx.z) % g.splits;
  const int grp = g.group_base + static_cast<int>(blockIdx.z) / g.splits;

  const int64_t ktiles = (g.depth + Sh::BK - 1) / Sh::BK;
  const int64_t kt_begin = split * g.ktiles_per_split;
  const int64_t kt_end = kt_begin + g.ktiles_per_split < ktiles ? kt_begin + g.ktiles_per_split
                                                                 : ktiles;
  Loader<T, Sh, KIND, VEC, MATH> loader;
  loader.init(g, m0, n0, grp, tid);
  Mma math;
  math.zero();
  if (kt_begin < kt_end) {
    loader.load(g, kt_begin * Sh::BK);
    loader.store(smem, smem + Sh::BM * kPitch, tid);
    __syncthreads();
    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
      unsigned char* cur = smem + ((kt - kt_begin) & 1) * Sh::STAGE;
      unsigned char* next = smem + (((kt - kt_begin) & 1) ^ 1) * Sh::STAGE;
      const bool more = kt + 1 < kt_end;
      if (more) loader.load(g, (kt + 1) * Sh::BK);  // global loads in flight during the math
      math.step(cur, cur + Sh::BM * kPitch, tid);
      if (more) loader.store(next, next + Sh::BM * kPitch, tid);
      __syncthreads();
    }
  }
  const Epilogue<T, KIND> epi{g, grp, split, g.splits > 1};
  math.finish(epi, m0, n0, tid);
}

// Split-K: out element (grp, i, j) = sum over splits s (in order) of workspace[s][grp][i][j].
template <typename T>
__global__ void splitk_reduce_kernel(const IGemmArgs g) {
  const acc_t<T>* ws = static_cast<const acc_t<T>*>(g.workspace);
  T* out = static_cast<T*>(g.out);
  const int64_t per_group = g.rows * g.cols;
  const int64_t total = per_group * g.groups;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t<T> sum = ws[e];
    for (int s = 1; s < g.splits; ++s) sum += ws[s * total + e];
    const int64_t grp = e / per_group;
    const int64_t i = (e - grp * per_group) / g.cols;
    const int64_t j = e - grp * per_group - i * g.cols;
    const int64_t rs = j / g.Cg, c = j - rs * g.Cg;
    const int64_t r = rs / g.S;
    out[(grp * g.Kg + i) * g.out_stride[0] + c * g.out_stride[1] + r * g.out_stride[2] +
        (rs - r * g.S) * g.out_stride[3]] = static_cast<T>(sum);
  }
}

// ---------------------------------------------------------------------------------- launching

template <typename T, Math MATH, class Sh, class Mma, bool VEC>
void launch(Kind kind, const IGemmArgs& g) {
  const int64_t mt = (g.rows + Sh::BM - 1) / Sh::BM, nt = (g.cols + Sh::BN - 1) / Sh::BN;
  const int64_t x = kind == Kind::kBackwardWeight ? nt : mt;
  const int64_t y = kind == Kind::kBackwardWeight ? mt : nt;
  const int64_t z = static_cast<int64_t>(g.splits) * g.groups_in_launch;
  TORCH_CHECK(x < (int64_t{1} << 31) && y <= 65535 && z <= 65535,
              "dlext::conv2d (CUDA): the problem needs a grid of ", x, " x ", y, " x ", z,
              " blocks, more than CUDA allows");
  const dim3 grid(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
  const cudaStream_t stream = cuda::current_stream();
  switch (kind) {
    case Kind::kForward:
      igemm_kernel<T, MATH, Sh, Mma, Kind::kForward, VEC><<<grid, Sh::THREADS, 0, stream>>>(g);
      break;
    case Kind::kBackwardData:
      igemm_kernel<T, MATH, Sh, Mma, Kind::kBackwardData, VEC><<<grid, Sh::THREADS, 0, stream>>>(g);
      break;
    case Kind::kBackwardWeight:
      igemm_kernel<T, MATH, Sh, Mma, Kind::kBackwardWeight, VEC><<<grid, Sh::THREADS, 0, stream>>>(g);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tensor-core tiles: 128x128 with 8 warps (64x32 warp tiles), 128x64 and 64x64 with 4 warps
// (64x32 and 32x32). Element-wise (non-VEC) gathers always use 64x64: they serve awkward channel
// counts, and one tile keeps the number of kernels down.
template <typename T>
void tensor_core(Kind kind, Tile tile, bool vec, const IGemmArgs& g) {
  using S128x128 = Shape<T, 128, 128, 256>;
  using S128x64 = Shape<T, 128, 64, 128>;
  using S64x64 = Shape<T, 64, 64, 128>;
  using M128x128 = TensorCoreMath<T, S128x128, 2, 4>;
  using M128x64 = TensorCoreMath<T, S128x64, 2, 2>;
  using M64x64 = TensorCoreMath<T, S64x64, 2, 2>;
  if (!vec) {
    launch<T, Math::kTensorCore, S64x64, M64x64, false>(kind, g);
  } else if (tile == Tile::k64x64) {
    launch<T, Math::kTensorCore, S64x64, M64x64, true>(kind, g);
  } else if (tile == Tile::k128x64) {
    launch<T, Math::kTensorCore, S128x64, M128x64, true>(kind, g);
  } else {
    launch<T, Math::kTensorCore, S128x128, M128x128, true>(kind, g);
  }
}

template <typename T>
void fma_path(Kind kind, bool vec, const IGemmArgs& g) {
  using S = Shape<T, 64, 64, 256>;
  if (vec) {
    launch<T, Math::kFMA, S, FmaMath<T, S>, true>(kind, g);
  } else {
    launch<T, Math::kFMA, S, FmaMath<T, S>, false>(kind, g);
  }
}

template <typename T>
void reduce(const IGemmArgs& g) {
  const int64_t total = g.rows * g.cols * g.groups;
  constexpr int kThreads = 256;
  splitk_reduce_kernel<T><<<cuda::grid_for(total, kThreads), kThreads, 0, cuda::current_stream()>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace igemm
}  // namespace conv2d_cuda
}  // namespace dlext

namespace dlext {
namespace conv2d_cuda {

// The entry points of conv2d_cuda.cuh, explicitly instantiated per dtype in
// conv2d_igemm_{f16,bf16,f32,f64}_cuda.cu so that the dtypes compile in parallel.
template <typename T>
void igemm_tensor_core(Kind kind, Tile tile, bool vec, const IGemmArgs& args) {
  igemm::tensor_core<T>(kind, tile, vec, args);
}

template <typename T>
void igemm_fma(Kind kind, bool vec, const IGemmArgs& args) {
  igemm::fma_path<T>(kind, vec, args);
}

template <typename T>
void splitk_reduce(const IGemmArgs& args) {
  igemm::reduce<T>(args);
}

}  // namespace conv2d_cuda
}  // namespace dlext
