// max_pool2d on the CPU: values and int64 indices (flat h * W + w per plane), and the backward
// that adds each output gradient to the input element its index names.
//
// Forward, NCHW: one task per range of (plane, output row); each output scans its window with the
// bounds clamped once per row and column (no per-tap bounds test) and branch-free updates.
// Channels_last: vectorised across channels (see forward_channels_last). Comparisons are torch's:
// a value wins if it is greater or NaN (so NaN propagates and the last NaN's index is kept), ties
// keep the first maximum, an all -inf window gives its first tap, and 16-bit floats compare in
// float.
// Backward: a plane (NCHW) or a (batch, channel block) (channels_last) belongs to one task, so
// the scatter-add needs no atomics and its order, hence the result, is fixed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_opmath_vec.h"
#include "common/outputs.h"
#include "max_pool2d/max_pool2d_common.h"

namespace dlext {
namespace {

template <typename acc_t>
constexpr acc_t lowest() {
  return std::numeric_limits<acc_t>::has_infinity ? -std::numeric_limits<acc_t>::infinity()
                                                  : std::numeric_limits<acc_t>::lowest();
}

// torch's rule: a value replaces the running maximum if it is greater or NaN.
template <typename acc_t>
inline bool wins(acc_t val, acc_t best) {
  if constexpr (std::is_floating_point_v<acc_t>) {
    return val > best || val != val;
  } else {
    return val > best;
  }
}

// NCHW: tasks are ranges of (plane, output row); the window's row and column bounds are clamped
// once, and the max/argmax update is branch-free (selects), so random data does not mispredict.
template <typename scalar_t>
void forward_nchw(const scalar_t* in, scalar_t* out, int64_t* idx, const Pool2d& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = p.batch * p.channels * p.out_h;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, p.out_w * p.kh * p.kw));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / p.out_h;
      const int64_t oh = r % p.out_h;
      const scalar_t* src = in + plane * p.in_h * p.in_w;
      scalar_t* dst = out + r * p.out_w;
      int64_t* dst_idx = idx + r * p.out_w;
      const int64_t h0 = p.h_begin(oh), h1 = p.h_end(oh);
      const int64_t W = p.in_w, dh = p.dh, dw = p.dw;  // locals: kept in registers
      for (int64_t ow = 0; ow < p.out_w; ++ow) {
        const int64_t w0 = p.w_begin(ow), w1 = p.w_end(ow);
        acc_t best = lowest<acc_t>();
        int64_t best_i = (h0 < h1 && w0 < w1) ? h0 * W + w0 : -1;
        for (int64_t h = h0; h < h1; h += dh) {
          const scalar_t* line = src + h * W;
          for (int64_t w = w0; w < w1; w += dw) {
            const acc_t v = static_cast<acc_t>(line[w]);
            const bool take = wins(v, best);
            best = take ? v : best;
            best_i = take ? h * W + w : best_i;
          }
        }
        dst[ow] = static_cast<scalar_t>(best);
        dst_idx[ow] = best_i;
      }
    }
  });
}

// The flat input index of every tap of one output pixel's (clamped) window, in scan order
// (row-major, so the first maximum wins ties as in torch). Returns the number of taps.
inline int64_t window_taps(const Pool2d& p, int64_t oh, int64_t ow, int64_t* taps) {
  int64_t n = 0;
  for (int64_t h = p.h_begin(oh); h < p.h_end(oh); h += p.dh) {
    for (int64_t w = p.w_begin(ow); w < p.w_end(ow); w += p.dw) taps[n++] = h * p.in_w + w;
  }
  return n;
}

// An int32 index's bits in a float lane, or an int64's in a double lane: the argmax is carried
// through compare + blend (a bitwise select) without ever being converted. Indices stay below
// 2^30 (see forward_channels_last), so no pattern is a signalling NaN.
template <typename acc_t>
acc_t index_bits(int64_t i) {
  using int_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  const int_t narrow = static_cast<int_t>(i);
  acc_t bits;
  std::memcpy(&bits, &narrow, sizeof(bits));
  return bits;
}

// The int64 indices whose bits a vector holds (index_bits): doubles' bits are the indices; floats'
// are int32, widened in registers.
template <typename Vec>
inline void store_indices(const Vec& bits, int64_t* dst) {
  if constexpr (sizeof(typename Vec::value_type) == 8) {
    bits.store(dst);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    const __m256i narrow = _mm256_castps_si256(bits);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_cvtepi32_epi64(_mm256_castsi256_si128(narrow)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4),
                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(narrow, 1)));
#else
    int32_t narrow[Vec::size()];
    bits.store(narrow);
    for (int64_t k = 0; k < Vec::size(); ++k) dst[k] = narrow[k];
#endif
  }
}

// U vectors of channels [c, c + U * lanes) of one output pixel: U independent compare + blend
// chains per tap, so the latency of one does not stall the loop.
template <int U, typename Vec, typename scalar_t>
inline void scan_taps(const scalar_t* src, int64_t C, int64_t c, const int64_t* taps,
                      const typename Vec::value_type* tap_bits, int64_t nt, bool full, int64_t cnt,
                      scalar_t* dst, int64_t* dst_idx) {
  using acc_t = typename Vec::value_type;
  // As torch: the first tap's index until a value wins (an all -inf window keeps it), -1 for an
  // empty window.
  const Vec first(nt ? tap_bits[0] : index_bits<acc_t>(-1));
  Vec best[U], arg[U];
  for (int u = 0; u < U; ++u) {
    best[u] = Vec(lowest<acc_t>());
    arg[u] = first;
  }
  for (int64_t t = 0; t < nt; ++t) {
    const scalar_t* at_tap = src + taps[t] * C + c;
    const Vec bits(tap_bits[t]);
    for (int u = 0; u < U; ++u) {
      const Vec v = full ? Vec::loadu(at_tap + u * Vec::size())
                         : cpu::OpmathVec<scalar_t>::load(at_tap, cnt);
      const Vec take = (v > best[u]) | v.isnan();
      best[u] = Vec::blendv(best[u], v, take);
      arg[u] = Vec::blendv(arg[u], bits, take);
    }
  }
  if (cnt == U * Vec::size()) {
    for (int u = 0; u < U; ++u) {
      best[u].store(dst + c + u * Vec::size());
      store_indices(arg[u], dst_idx + c + u * Vec::size());
    }
  } else {  // U == 1, a tail
    cpu::OpmathVec<scalar_t>::store(dst + c, best[0], cnt);
    int64_t wide[Vec::size()];
    store_indices(arg[0], wide);
    std::copy(wide, wide + cnt, dst_idx + c);
  }
}

// Channels_last: for each output pixel, channels in vectors (8 floats with AVX2): the running
// maximum and the flat index of the winning tap (its bits, see index_bits) live in two registers,
// updated by compare + blend; each tap's channels are contiguous, so every load is a full vector
// (the last C % 8 channels a whole vector read past them while that stays inside the input, and
// stored partially: masked loads and stores are slow on AMD cores). Float indices are widened to
// int64 in vector registers. Planes of 2^30 elements or more, and 16-bit floats, take the scalar
// loop (same order).
template <typename scalar_t>
void forward_channels_last(const scalar_t* in, scalar_t* out, int64_t* idx, const Pool2d& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  constexpr bool kVector = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
  const bool vector = p.in_h * p.in_w < (int64_t{1} << 30);
  const int64_t C = p.channels;
  const int64_t plane = p.in_h * p.in_w;
  const int64_t pixels = p.batch * p.out_h * p.out_w;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C * p.kh * p.kw));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> taps(p.kh * p.kw);  // a window has at most kh * kw taps
    std::vector<acc_t> tap_bits(p.kh * p.kw);
    for (int64_t px = begin; px < end; ++px) {
      const int64_t n = px / (p.out_h * p.out_w);
      const int64_t nt = window_taps(p, (px / p.out_w) % p.out_h, px % p.out_w, taps.data());
      const scalar_t* src = in + n * plane * C;
      scalar_t* dst = out + px * C;
      int64_t* dst_idx = idx + px * C;
      int64_t c = 0;
      if constexpr (kVector) {
        if (vector) {
          for (int64_t t = 0; t < nt; ++t) tap_bits[t] = index_bits<acc_t>(taps[t]);
          // The last window tap is the highest address; reading whole vectors past channel C
          // (into the next pixel) is fine while that stays inside the input.
          const int64_t last = nt ? n * plane * C + taps[nt - 1] * C : 0;
          for (; c + 4 * kLanes <= C; c += 4 * kLanes) {
            scan_taps<4, Vec>(src, C, c, taps.data(), tap_bits.data(), nt, true, 4 * kLanes, dst,
                              dst_idx);
          }
          if (c + 2 * kLanes <= C) {
            scan_taps<2, Vec>(src, C, c, taps.data(), tap_bits.data(), nt, true, 2 * kLanes, dst,
                              dst_idx);
            c += 2 * kLanes;
          }
          for (; c < C; c += kLanes) {
            const int64_t cnt = std::min<int64_t>(kLanes, C - c);
            const bool full = cnt == kLanes || last + c + kLanes <= p.batch * plane * C;
            scan_taps<1, Vec>(src, C, c, taps.data(), tap_bits.data(), nt, full, cnt, dst,
                              dst_idx);
          }
        }
      }
      for (; c < C; ++c) {
        acc_t best = lowest<acc_t>();
        int64_t arg = 0;
        for (int64_t t = 0; t < nt; ++t) {
          const acc_t v = static_cast<acc_t>(src[taps[t] * C + c]);
          const bool take = wins(v, best);
          best = take ? v : best;
          arg = take ? t : arg;
        }
        dst[c] = static_cast<scalar_t>(best);
        dst_idx[c] = nt ? taps[arg] : -1;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& self,
                                                  at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode) {
  check_max_pool2d_dtype(self);
  const Pool2d p = max_pool2d_geometry(self.sizes(), is_channels_last(self), kernel_size, stride,
                                       padding, dilation, ceil_mode);
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = self.contiguous(fmt);
  const auto sizes = pool_output_sizes(self.sizes(), p);
  at::Tensor out = new_empty(sizes, x.options(), fmt);
  at::Tensor indices = new_empty(sizes, x.options().dtype(at::kLong), fmt);
  if (out.numel() == 0) return {out, indices};
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dlext::max_pool2d", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    int64_t* i = indices.mutable_data_ptr<int64_t>();
    if (p.channels_last) {
      forward_channels_last(in, o, i, p);
    } else {
      forward_nchw(in, o, i, p);
    }
  });
  return {out, indices};
}

[[noreturn]] void bad_index(int64_t i, int64_t plane_size) {
  TORCH_CHECK(false, "dlext::max_pool2d_backward: index ", i, " is outside the input plane of ",
              plane_size, " elements");
}

// Adds `count` gradients g[k * step] into acc[ix[k * step] * acc_step], the indices checked first.
template <typename scalar_t, typename acc_t>
inline void scatter_add(const scalar_t* g, const int64_t* ix, int64_t count, int64_t step,
                        acc_t* acc, int64_t acc_step, int64_t in_plane) {
  for (int64_t k = 0; k < count; ++k) {
    const int64_t i = ix[k * step];
    if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(in_plane)) {
      if (i == -1) continue;  // an empty window: no input element
      bad_index(i, in_plane);
    }
    acc[i * acc_step] += static_cast<acc_t>(g[k * step]);
  }
}

// NCHW: a task owns whole planes. Float and double accumulate in the output itself; 16-bit floats
// in a float plane, rounded once at the end.
template <typename scalar_t>
void backward_nchw(const scalar_t* go, const int64_t* idx, scalar_t* gi, int64_t planes,
                   int64_t out_plane, int64_t in_plane) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(std::is_same_v<acc_t, scalar_t> ? 0 : in_plane);
    for (int64_t plane = begin; plane < end; ++plane) {
      scalar_t* dst = gi + plane * in_plane;
      const scalar_t* g = go + plane * out_plane;
      const int64_t* ix = idx + plane * out_plane;
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        std::fill(dst, dst + in_plane, scalar_t(0));
        scatter_add(g, ix, out_plane, 1, dst, 1, in_plane);
      } else {
        std::fill(buffer.begin(), buffer.end(), acc_t(0));
        scatter_add(g, ix, out_plane, 1, buffer.data(), 1, in_plane);
        std::copy(buffer.begin(), buffer.end(), dst);
      }
    }
  });
}

// Channels_last: a task owns one image's block of channels. It walks the output pixels in order,
// reading each pixel's gradients and indices for the block contiguously. Input rows are zeroed
// just before the first write can reach them (the rows of the current window, or of any index
// further down), so the zeroing and the adds stay in cache and every line is written back once;
// rows no index reaches are zeroed at the end. 16-bit floats accumulate in a float buffer.
template <typename scalar_t>
void backward_channels_last(const scalar_t* go, const int64_t* idx, scalar_t* gi,
                            const Pool2d& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<acc_t, scalar_t>;
  constexpr int64_t kBlock = 64;  // channels per task
  const int64_t C = p.channels, in_h = p.in_h, in_w = p.in_w, out_h = p.out_h, out_w = p.out_w;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  const int64_t in_plane = in_h * in_w, out_plane = out_h * out_w;
  at::parallel_for(0, p.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      const int64_t c0 = (task % blocks) * kBlock;
      const int64_t cb = std::min(kBlock, C - c0);
      scalar_t* dst = gi + n * in_plane * C + c0;
      acc_t* acc;  // element (pixel k, channel c0 + c) at acc[k * stride + c]
      int64_t stride;
      if constexpr (kDirect) {
        acc = dst;
        stride = C;
      } else {
        buffer.resize(in_plane * cb);
        acc = buffer.data();
        stride = cb;
      }
      int64_t zeroed = 0;  // input rows [0, zeroed) are zeroed
      auto zero_rows_to = [&](int64_t row_end) {
        if (row_end <= zeroed) return;
        if (stride == cb) {
          std::fill(acc + zeroed * in_w * cb, acc + row_end * in_w * cb, acc_t(0));
        } else {
          for (int64_t k = zeroed * in_w; k < row_end * in_w; ++k) {
            std::fill(acc + k * stride, acc + k * stride + cb, acc_t(0));
          }
        }
        zeroed = row_end;
      };
      for (int64_t oh = 0; oh < out_h; ++oh) {
        zero_rows_to(p.h_end(oh));  // the last row this output row's windows cover
        int64_t limit = std::min(zeroed, in_h) * in_w;  // indices below it land on zeroed rows
        for (int64_t o = oh * out_w; o < (oh + 1) * out_w; ++o) {
          const scalar_t* g = go + (n * out_plane + o) * C + c0;
          const int64_t* ix = idx + (n * out_plane + o) * C + c0;
          for (int64_t c = 0; c < cb; ++c) {
            const int64_t i = ix[c];
            if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(limit)) {
              if (i == -1) continue;  // an empty window: no input element
              if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(in_plane)) {
                bad_index(i, in_plane);
              }
              zero_rows_to(i / in_w + 1);  // an index outside its window, further down
              limit = zeroed * in_w;
            }
            acc[i * stride + c] += static_cast<acc_t>(g[c]);
          }
        }
      }
      zero_rows_to(in_h);
      if constexpr (!kDirect) {
        for (int64_t k = 0; k < in_plane; ++k) {
          for (int64_t c = 0; c < cb; ++c) dst[k * C + c] = static_cast<scalar_t>(acc[k * cb + c]);
        }
      }
    }
  });
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                   at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  const Pool2d p = check_max_pool2d_backward_args(grad_output, indices, input_size, kernel_size,
                                                  stride, padding, dilation, ceil_mode);
  const bool channels_last = p.channels_last;
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor go = grad_output.contiguous(fmt);
  const at::Tensor ix = indices.contiguous(fmt);
  at::Tensor grad_input = new_empty(input_size, go.options(), fmt);
  if (grad_input.numel() == 0) return grad_input;
  const int64_t C = input_size[input_size.size() - 3];
  const int64_t batch = indices.dim() == 4 ? indices.size(0) : 1;
  const int64_t in_plane = input_size[input_size.size() - 2] * input_size[input_size.size() - 1];
  const int64_t out_plane = indices.size(-2) * indices.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "dlext::max_pool2d_backward", [&] {
    const scalar_t* g = go.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      backward_channels_last(g, ix.const_data_ptr<int64_t>(), gi, p);
    } else {
      backward_nchw(g, ix.const_data_ptr<int64_t>(), gi, batch * C, out_plane, in_plane);
    }
  });
  return grad_input;
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CPU, m) {
  m.impl("max_pool2d", &dlext::max_pool2d_cpu);
  m.impl("max_pool2d_backward", &dlext::max_pool2d_backward_cpu);
}
