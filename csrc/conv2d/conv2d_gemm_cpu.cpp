// conv2d on the CPU as patch matrices times weights: for each tile of output pixels and each
// group, forward  Y = W @ col (NCHW) or Y = rows @ W^T (NHWC); backward dcol = W^T @ dY scattered
// back (col2im / row2im), and dW += dY @ col^T summed over tiles.
//
// Why it is fast: the FLOPs are in a BLAS GEMM (at::mm / addmm, the one native piece allowed);
// everything around it is arranged to keep that GEMM fed from cache. Tiles are sized so a patch
// tile (Cg*R*S x pixels) stays in L2 between being built and being multiplied; images too small
// to fill a tile are batched into one (NHWC rows of consecutive images are contiguous already,
// NCHW ones go through a small staging buffer), so LeNet-sized problems still make GEMMs worth
// calling. 1x1 stride-1 unpadded convolutions skip the patch matrix: the input is its own.
// Threads take whole tiles with single-threaded GEMMs, each with its own buffers; the weight
// gradient is summed per thread and the per-thread sums added in thread order, and scattered
// input gradients never race (a thread owns whole images, or owns a private copy of the one it
// shares), so results do not depend on timing. The bias is written into the output first and
// the GEMM accumulates onto it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv2d/conv2d_kernels_cpu.h"
#include "conv2d/conv2d_patches_cpu.h"

namespace dlext {
namespace conv2d_cpu {
namespace {

constexpr int64_t kPatchTileBytes = 512 * 1024;  // a patch tile that stays in a 1 MiB L2
constexpr int64_t kMinTilePixels = 64;           // narrower tiles make poor GEMMs
constexpr int64_t kDirectTilePixels = 4096;      // no patch matrix: tiles only share out work
constexpr int64_t kMinTaskMacs = 1 << 18;        // less work than this is not worth a thread

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// C (m x n, row-major, leading dimension ldc) = [C +] op(A) @ op(B), where op(X) is X, or X^T
// when trans_x; each operand is row-major in memory with its leading dimension.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
          const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    return trans ? at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, opts)
                 : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (accumulate) {
    out.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
  } else {
    at::mm_out(out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
  }
}

// A tile: output pixels [p0, p0 + tp) of each of the nb images n0, n0 + 1, ...; with nb > 1 the
// tile holds whole images (p0 == 0, tp == P).
struct Tile {
  int64_t n0, nb, p0, tp;
  int64_t pixels() const { return nb * tp; }
};

struct Tiling {
  int64_t N, P;
  int64_t nb = 1;  // images per tile
  int64_t nt = 1;  // tiles per image (nb == 1 when nt > 1)
  int64_t tp = 0;  // pixels per image per tile
  int64_t count = 0;

  Tile operator[](int64_t i) const {
    if (nt == 1) {
      const int64_t n0 = i * nb;
      return {n0, std::min(nb, N - n0), 0, P};
    }
    const int64_t p0 = (i % nt) * tp;
    return {i / nt, 1, p0, std::min(tp, P - p0)};
  }
  int64_t max_pixels() const { return nb * tp; }
};

Tiling make_tiling(const Conv2dGeometry& g, bool direct, int64_t elem_size, int64_t threads) {
  Tiling t;
  t.N = g.N;
  t.P = g.Ho * g.Wo;
  const int64_t patch_bytes = g.patch() * elem_size;
  const int64_t budget =
      direct ? kDirectTilePixels : std::max(kMinTilePixels, kPatchTileBytes / patch_bytes);
  if (t.P <= budget && g.N >= threads) {
    t.tp = t.P;
    t.nb = std::max<int64_t>(1, std::min(budget / t.P, ceil_div(g.N, threads)));
    t.count = ceil_div(g.N, t.nb);
    return t;
  }
  // Large images, or too few of them to go round: several tiles per image, as many in all as a
  // multiple of the thread count where the tiles stay wide enough (7 tiles on 2 threads would
  // leave one thread idle for a seventh of the time).
  const int64_t most = std::max<int64_t>(1, ceil_div(t.P, kMinTilePixels));
  int64_t nt = std::min(most, ceil_div(t.P, budget));
  while ((g.N * nt) % threads != 0 && nt < most) ++nt;
  t.tp = ceil_div(t.P, nt);
  t.nt = ceil_div(t.P, t.tp);
  t.count = g.N * t.nt;
  return t;
}

// Threads worth using: one per kMinTaskMacs multiply-adds at most.
int64_t useful_threads(const Conv2dGeometry& g) {
  const int64_t macs = g.N * g.Ho * g.Wo * g.K * g.patch();
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), macs / kMinTaskMacs));
}

// 1x1, stride 1, no padding: the input is its own patch matrix (dilation is irrelevant).
bool is_pointwise(const Conv2dGeometry& g) {
  return g.R == 1 && g.S == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_t == 0 &&
         g.pad_b == 0 && g.pad_l == 0 && g.pad_r == 0;
}

// A pointwise NHWC convolution of N images is one of a single image N times as tall: its rows
// (pixels) are contiguous across images. Tiling that image spreads work evenly for any N.
Conv2dGeometry as_one_image(Conv2dGeometry g) {
  g.H *= g.N;
  g.Ho *= g.N;
  g.N = 1;
  return g;
}

// Per-thread scratch buffers, allocated on first use by the thread that owns them.
template <typename T>
struct Scratch {
  at::Tensor patch, dpatch, stage;
  static T* get(at::Tensor& t, int64_t n) {
    if (!t.defined()) t = at::empty({n}, at::dtype(c10::CppTypeToScalarType<T>::value));
    return t.mutable_data_ptr<T>();
  }
};

template <typename T>
class GemmConv {
 public:
  GemmConv(const Conv2dGeometry& geometry)
      : pointwise_(is_pointwise(geometry)),
        g_(pointwise_ && geometry.channels_last ? as_one_image(geometry) : geometry),
        D_(g_.patch()),
        P_(g_.Ho * g_.Wo),
        tiles_(make_tiling(g_, pointwise_, sizeof(T), useful_threads(g_))),
        grain_(ceil_div(kMinTaskMacs, g_.K * D_ * tiles_.max_pixels())),
        spans_(g_.channels_last ? tap_spans(g_) : std::vector<Span>()) {}

  void forward(const T* x, const T* w, const T* bias, T* y) const {
    at::parallel_for(0, tiles_.count, grain_, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Scratch<T> s;
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t grp = 0; grp < g_.groups; ++grp) {
          forward_tile(tiles_[i], grp, x, w, bias, y, s);
        }
      }
    });
  }

  // dx and dw may be null (not wanted).
  void backward(const T* dy, const T* x, const T* w, T* dx, T* dw) const {
    const int64_t threads = at::get_num_threads();
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    std::vector<at::Tensor> dw_sums(threads);  // one weight-gradient sum per thread
    const int64_t image = g_.C * g_.H * g_.W;
    // Unless tiles write their part of dx outright, dx accumulates scattered patches: zero it.
    const bool scatter = dx != nullptr && !(pointwise_ && (g_.channels_last || tiles_.nb == 1));
    if (scatter) fill_zero(dx, g_.N * image);

    // Runs tiles [first, last) with the calling thread's buffers; dx_of(n) is where image n's
    // input gradient accumulates.
    const auto run = [&](int64_t first, int64_t last, const auto& dx_of) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Scratch<T> s;
      T* dw_sum = nullptr;
      if (dw != nullptr) {
        at::Tensor& sum = dw_sums[at::get_thread_num()];
        if (!sum.defined()) sum = at::zeros({g_.K * D_}, opts);
        dw_sum = sum.mutable_data_ptr<T>();
      }
      for (int64_t i = first; i < last; ++i) {
        for (int64_t grp = 0; grp < g_.groups; ++grp) {
          backward_tile(tiles_[i], grp, dy, x, w, dx_of, dw_sum, s);
        }
      }
    };
    const auto own_image = [&](int64_t n) { return dx == nullptr ? nullptr : dx + n * image; };

    if (!scatter || tiles_.nt == 1) {  // tiles write disjoint parts of dx
      at::parallel_for(0, tiles_.count, grain_,
                       [&](int64_t b, int64_t e) { run(b, e, own_image); });
    } else {
      // Tiles of one image scatter into overlapping rows of it. Threads take whole images while
      // there are enough to go round; each of the last (N mod threads) images is shared out by
      // tiles, every thread scattering into a private copy, and the copies added in order.
      const int64_t whole = g_.N / threads * threads;
      at::parallel_for(0, whole, 1, [&](int64_t b, int64_t e) {
        run(b * tiles_.nt, e * tiles_.nt, own_image);
      });
      for (int64_t n = whole; n < g_.N; ++n) {
        std::vector<at::Tensor> copies(threads);
        at::parallel_for(n * tiles_.nt, (n + 1) * tiles_.nt, grain_, [&](int64_t b, int64_t e) {
          at::Tensor& mine = copies[at::get_thread_num()];
          mine = at::zeros({image}, opts);
          T* p = mine.mutable_data_ptr<T>();
          run(b, e, [p](int64_t) { return p; });
        });
        sum_in_order(copies, dx + n * image, image);
      }
    }
    if (dw != nullptr) sum_in_order(dw_sums, dw, g_.K * D_);
  }

 private:
  static void fill_zero(T* p, int64_t n) {
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) { std::fill(p + b, p + e, T(0)); });
  }

  // out = sum of the defined parts, in index order (a fixed order: deterministic).
  static void sum_in_order(const std::vector<at::Tensor>& parts, T* out, int64_t n) {
    std::vector<const T*> ptrs;
    for (const at::Tensor& t : parts) {
      if (t.defined()) ptrs.push_back(t.const_data_ptr<T>());
    }
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      if (ptrs.empty()) {
        std::fill(out + b, out + e, T(0));
        return;
      }
      std::memcpy(out + b, ptrs[0] + b, (e - b) * sizeof(T));
      for (size_t k = 1; k < ptrs.size(); ++k) scatter_add_run(out + b, 1, ptrs[k] + b, e - b);
    });
  }

  // The patch matrix of group grp over tile t: NCHW (D x pixels), NHWC (pixels x D); returns it
  // and its leading dimension, a view of the input itself for pointwise convolutions.
  std::pair<const T*, int64_t> patches(const Tile& t, int64_t grp, const T* x,
                                       Scratch<T>& s) const {
    const int64_t pix = t.pixels();
    if (g_.channels_last) {
      if (pointwise_) return {x + (t.n0 * P_ + t.p0) * g_.C + grp * g_.Cg, g_.C};
      T* rows = Scratch<T>::get(s.patch, D_ * tiles_.max_pixels());
      for (int64_t i = 0; i < t.nb; ++i) {
        im2row_tile(x + (t.n0 + i) * g_.H * g_.W * g_.C + grp * g_.Cg, g_, spans_, t.p0, t.tp,
                    rows + i * t.tp * D_);
      }
      return {rows, D_};
    }
    if (pointwise_ && t.nb == 1) return {x + (t.n0 * g_.C + grp * g_.Cg) * P_ + t.p0, P_};
    T* col = Scratch<T>::get(s.patch, D_ * tiles_.max_pixels());
    for (int64_t i = 0; i < t.nb; ++i) {
      im2col_tile(x + ((t.n0 + i) * g_.C + grp * g_.Cg) * g_.H * g_.W, g_, t.p0, t.tp,
                  col + i * t.tp, pix);
    }
    return {col, pix};
  }

  void forward_tile(const Tile& t, int64_t grp, const T* x, const T* w, const T* bias, T* y,
                    Scratch<T>& s) const {
    const int64_t Kg = g_.Kg, pix = t.pixels();
    const T* wg = w + grp * Kg * D_;
    const T* bg = bias == nullptr ? nullptr : bias + grp * Kg;
    const auto [p, ldp] = patches(t, grp, x, s);
    if (g_.channels_last) {  // rows of consecutive images are consecutive: write Y in place
      T* yt = y + (t.n0 * P_ + t.p0) * g_.K + grp * Kg;
      if (bg != nullptr) {
        for (int64_t q = 0; q < pix; ++q) std::memcpy(yt + q * g_.K, bg, Kg * sizeof(T));
      }
      gemm(false, true, pix, Kg, D_, p, ldp, wg, D_, bg != nullptr, yt, g_.K);
      return;
    }
    if (t.nb == 1) {
      T* yt = y + (t.n0 * g_.K + grp * Kg) * P_ + t.p0;
      if (bg != nullptr) {
        for (int64_t k = 0; k < Kg; ++k) std::fill(yt + k * P_, yt + k * P_ + t.tp, bg[k]);
      }
      gemm(false, false, Kg, t.tp, D_, wg, D_, p, ldp, bg != nullptr, yt, P_);
      return;
    }
    // Several NCHW images: one GEMM into a staging buffer, then each image's rows (+ bias).
    T* stage = Scratch<T>::get(s.stage, Kg * tiles_.max_pixels());
    gemm(false, false, Kg, pix, D_, wg, D_, p, ldp, false, stage, pix);
    for (int64_t i = 0; i < t.nb; ++i) {
      for (int64_t k = 0; k < Kg; ++k) {
        T* dst = y + ((t.n0 + i) * g_.K + grp * Kg + k) * P_;
        const T* src = stage + k * pix + i * P_;
        if (bg == nullptr) {
          std::memcpy(dst, src, P_ * sizeof(T));
        } else {
          add_scalar(dst, src, bg[k], P_);
        }
      }
    }
  }

  // dst[j] = src[j] + v.
  static void add_scalar(T* dst, const T* src, T v, int64_t n) {
    using Vec = at::vec::Vectorized<T>;
    const Vec vv(v);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(src + j) + vv).store(dst + j);
    for (; j < n; ++j) dst[j] = src[j] + v;
  }

  template <typename DxOf>
  void backward_tile(const Tile& t, int64_t grp, const T* dy, const T* x, const T* w,
                     const DxOf& dx_of, T* dw_sum, Scratch<T>& s) const {
    const int64_t Kg = g_.Kg, Cg = g_.Cg, pix = t.pixels();
    const T* wg = w + grp * Kg * D_;
    T* dwg = dw_sum == nullptr ? nullptr : dw_sum + grp * Kg * D_;
    const bool want_dx = dx_of(t.n0) != nullptr;
    if (g_.channels_last) {
      const T* dyt = dy + (t.n0 * P_ + t.p0) * g_.K + grp * Kg;  // pix x Kg, leading dim K
      if (want_dx) {
        if (pointwise_) {
          T* dxt = dx_of(t.n0) + t.p0 * g_.C + grp * Cg;
          gemm(false, false, pix, Cg, Kg, dyt, g_.K, wg, D_, false, dxt, g_.C);
        } else {
          T* drows = Scratch<T>::get(s.dpatch, D_ * tiles_.max_pixels());
          gemm(false, false, pix, D_, Kg, dyt, g_.K, wg, D_, false, drows, D_);
          for (int64_t i = 0; i < t.nb; ++i) {
            row2im_tile(drows + i * t.tp * D_, g_, spans_, t.p0, t.tp,
                        dx_of(t.n0 + i) + grp * Cg);
          }
        }
      }
      if (dwg != nullptr) {
        const auto [p, ldp] = patches(t, grp, x, s);
        gemm(true, false, Kg, D_, pix, dyt, g_.K, p, ldp, true, dwg, D_);
      }
      return;
    }
    // NCHW: dY of the tile as a (Kg x pixels) matrix, staged when it spans several images.
    const T* dyt = dy + (t.n0 * g_.K + grp * Kg) * P_ + t.p0;
    int64_t lddy = P_;
    if (t.nb > 1) {
      T* stage = Scratch<T>::get(s.stage, Kg * tiles_.max_pixels());
      for (int64_t i = 0; i < t.nb; ++i) {
        for (int64_t k = 0; k < Kg; ++k) {
          std::memcpy(stage + k * pix + i * P_, dy + ((t.n0 + i) * g_.K + grp * Kg + k) * P_,
                      P_ * sizeof(T));
        }
      }
      dyt = stage;
      lddy = pix;
    }
    if (want_dx) {
      if (pointwise_ && t.nb == 1) {
        T* dxt = dx_of(t.n0) + grp * Cg * P_ + t.p0;
        gemm(true, false, Cg, t.tp, Kg, wg, D_, dyt, lddy, false, dxt, P_);
      } else {
        T* dcol = Scratch<T>::get(s.dpatch, D_ * tiles_.max_pixels());
        gemm(true, false, D_, pix, Kg, wg, D_, dyt, lddy, false, dcol, pix);
        for (int64_t i = 0; i < t.nb; ++i) {
          col2im_tile(dcol + i * t.tp, pix, g_, t.p0, t.tp,
                      dx_of(t.n0 + i) + grp * Cg * g_.H * g_.W);
        }
      }
    }
    if (dwg != nullptr) {
      const auto [p, ldp] = patches(t, grp, x, s);
      gemm(false, true, Kg, D_, pix, dyt, lddy, p, ldp, true, dwg, D_);
    }
  }

  const bool pointwise_;
  const Conv2dGeometry g_;
  const int64_t D_, P_;
  const Tiling tiles_;
  const int64_t grain_;             // tiles per task
  const std::vector<Span> spans_;  // NHWC: tap_spans(g_)
};

}  // namespace

void gemm_forward(const Conv2dGeometry& g, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& bias, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dlext::conv2d", [&] {
    GemmConv<scalar_t>(g).forward(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                  bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                  y.mutable_data_ptr<scalar_t>());
  });
}

void gemm_backward(const Conv2dGeometry& g, const at::Tensor& dy, const at::Tensor& x,
                   const at::Tensor& w, at::Tensor& dx, at::Tensor& dw) {
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "dlext::conv2d_backward", [&] {
    GemmConv<scalar_t>(g).backward(
        dy.const_data_ptr<scalar_t>(), dw.defined() ? x.const_data_ptr<scalar_t>() : nullptr,
        dx.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
        dx.defined() ? dx.mutable_data_ptr<scalar_t>() : nullptr,
        dw.defined() ? dw.mutable_data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace conv2d_cpu
}  // namespace dlext
