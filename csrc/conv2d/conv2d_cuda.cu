// conv2d on CUDA: the dlext::conv2d and dlext::conv2d_backward kernels. Each checks its arguments
// (conv2d_common.h, shared with the CPU), picks a kernel (plan), lays the operands out for it and
// runs it. No cuDNN, no cuBLAS, no im2col buffer.
//
// Which kernel a shape gets:
//   one input channel per group and at most 8 outputs per group (depthwise, LeNet's first layer):
//       the direct kernels of conv2d_direct_cuda.cu, reading every layout through its strides;
//   otherwise the implicit GEMM of conv2d_igemm_cuda.cuh, with activations in NHWC:
//     - float16 / bfloat16 on sm_80+: tensor cores (mma.sync m16n8k16), float accumulators;
//     - float32 on sm_80+ while torch.backends.cudnn.allow_tf32 is True (torch's default for
//       convolutions): TF32 tensor cores (m16n8k8); with it False: exact FMA;
//     - float64, and the 16-bit types before sm_80: FMA (64x64 tiles);
//     - tile (choose_tile): 128x128 when the grid still gives every SM a block, else 128x64
//       (also for 64 or fewer output channels), else 64x64 (small problems: more, smaller blocks);
//       channel counts that are not a multiple of 16 bytes (Cin = 3, odd groups) or unaligned
//       pointers use element-wise gathers and 64x64 tiles;
//     - backward-weight splits its reduction over N*Ho*Wo into slices (split-K) until about two
//       blocks per SM are busy, each slice at least 8 depth steps, summed in a fixed order.
// Layouts: channels_last is the fast one. NCHW input and grad_output are converted to NHWC once per
// call (a read and a write of each, no more than a few percent of a 3x3 convolution's time);
// results are written in the layout torch gives them (conv2d_uses_channels_last) directly.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "common/cuda_launch.cuh"
#include "common/outputs.h"
#include "conv2d/conv2d_common.h"
#include "conv2d/conv2d_cuda.cuh"

namespace dlext {
namespace {

using conv2d_cuda::IGemmArgs;
using conv2d_cuda::Kind;
using conv2d_cuda::Tile;

// torch's switch for TF32 in convolutions, read as its cuDNN convolution reads it. The accessor
// changed over releases: allowTF32CuDNN() (older), allowTF32CuDNN("conv") (string operator names),
// allowTF32CuDNN(Float32Op::CONV) (torch 2.10 and later, where torch.backends.cudnn.allow_tf32
// and torch.backends.cudnn.conv.fp32_precision both set it); overload resolution on the member's
// type picks the one this torch has.
// (Templates, so only the chosen body is compiled.)
template <typename Ctx, typename Op>
bool tf32_from(const Ctx& ctx, bool (Ctx::*)(std::optional<Op>) const) {
  return ctx.allowTF32CuDNN(Op::CONV);
}
template <typename Ctx>
bool tf32_from(const Ctx& ctx, bool (Ctx::*)(const std::string&) const) {
  return ctx.allowTF32CuDNN("conv");
}
template <typename Ctx>
bool tf32_from(const Ctx& ctx, bool (Ctx::*)() const) {
  return ctx.allowTF32CuDNN();
}

bool conv_allows_tf32() {
  const at::Context& ctx = at::globalContext();
  return tf32_from(ctx, &at::Context::allowTF32CuDNN);
}

bool use_direct(const Conv2dGeometry& g) { return g.Cg == 1 && g.Kg <= 8; }

// The implicit-GEMM kernels do coordinate arithmetic within one dimension in 32 bits.
void check_igemm_limits(const Conv2dGeometry& g, const char* op) {
  constexpr int64_t kMax = (int64_t{1} << 30) - 1;
  const int64_t largest = std::max({g.H + g.pad_t + g.pad_b, g.W + g.pad_l + g.pad_r, g.C, g.K,
                                    g.stride_h, g.stride_w, g.dil_h, g.dil_w});
  TORCH_CHECK(largest <= kMax, op, ": on CUDA, sizes, padded sizes, strides and dilations up to ",
              kMax, " are supported, but got ", largest);
  TORCH_CHECK(g.R * g.S * std::max(g.Cg, g.Kg) <= kMax, op, ": on CUDA, a kernel of ", g.R, "x",
              g.S, " with ", std::max(g.Cg, g.Kg), " channels per group is too large");
  // A pixel's position within its image plane is 32-bit too.
  constexpr int64_t kMaxPlane = (int64_t{1} << 31) - 1;
  TORCH_CHECK(g.H * g.W <= kMaxPlane && g.Ho * g.Wo <= kMaxPlane, op,
              ": on CUDA, image planes of up to ", kMaxPlane, " pixels are supported, but got ",
              g.H, "x", g.W, " in and ", g.Ho, "x", g.Wo, " out");
}

struct Plan {
  bool tensor_cores;
  at::ScalarType dtype;
  int elem_size;
};

// Compute capability major of the current device (queried once per device).
int device_major() {
  static int majors[64] = {0};
  const int dev = c10::cuda::current_device();
  if (dev < 64 && majors[dev] > 0) return majors[dev];
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (dev < 64) majors[dev] = major;
  return major;
}

Plan plan_for(const at::Tensor& input) {
  const at::ScalarType dt = input.scalar_type();
  const bool sm80 = device_major() >= 8;
  const bool tc = sm80 && (dt == at::kHalf || dt == at::kBFloat16 ||
                           (dt == at::kFloat && conv_allows_tf32()));
  return {tc, dt, static_cast<int>(input.element_size())};
}

// Tiles: the largest whose grid still gives every SM a block.
Tile choose_tile(int64_t rows, int64_t cols, int64_t groups) {
  const int64_t sms = cuda::sm_count();
  const auto blocks = [&](int64_t bm, int64_t bn) {
    return ((rows + bm - 1) / bm) * ((cols + bn - 1) / bn) * groups;
  };
  if (cols > 64 && blocks(128, 128) >= sms) return Tile::k128x128;
  if (rows > 64 && blocks(128, 64) >= sms) return Tile::k128x64;
  return Tile::k64x64;
}

// Backward-weight: the tile fits the (small) GEMM; split-K supplies the parallelism.
Tile choose_wgrad_tile(int64_t rows, int64_t cols) {
  if (rows <= 64) return Tile::k64x64;
  return cols <= 64 ? Tile::k128x64 : Tile::k128x128;
}

int64_t tile_rows(Tile t) { return t == Tile::k64x64 ? 64 : 128; }
int64_t tile_cols(Tile t) { return t == Tile::k128x128 ? 128 : 64; }

IGemmArgs base_args(const Conv2dGeometry& g) {
  IGemmArgs a{};
  a.N = g.N;
  a.C = g.C;
  a.H = g.H;
  a.W = g.W;
  a.K = g.K;
  a.Ho = g.Ho;
  a.Wo = g.Wo;
  a.R = static_cast<int32_t>(g.R);
  a.S = static_cast<int32_t>(g.S);
  a.Cg = static_cast<int32_t>(g.Cg);
  a.Kg = static_cast<int32_t>(g.Kg);
  a.groups = static_cast<int32_t>(g.groups);
  a.stride_h = static_cast<int32_t>(g.stride_h);
  a.stride_w = static_cast<int32_t>(g.stride_w);
  a.pad_t = static_cast<int32_t>(g.pad_t);
  a.pad_l = static_cast<int32_t>(g.pad_l);
  a.dil_h = static_cast<int32_t>(g.dil_h);
  a.dil_w = static_cast<int32_t>(g.dil_w);
  a.splits = 1;
  a.ktiles_per_split = int64_t{1} << 62;
  return a;
}

void set_output(IGemmArgs& a, at::Tensor& out) {
  a.out = out.mutable_data_ptr();
  for (int i = 0; i < 4; ++i) a.out_stride[i] = out.stride(i);
}

// Runs one implicit GEMM over every group (in launches of at most 65535 groups x splits).
void run_igemm(Kind kind, const Plan& plan, Tile tile, bool vec, IGemmArgs a) {
  const int32_t per_launch = std::max<int32_t>(1, 65535 / a.splits);
  for (int32_t base = 0; base < a.groups; base += per_launch) {
    a.group_base = base;
    a.groups_in_launch = std::min(per_launch, a.groups - base);
    switch (plan.dtype) {
      case at::kHalf:
        plan.tensor_cores ? conv2d_cuda::igemm_tensor_core<c10::Half>(kind, tile, vec, a)
                          : conv2d_cuda::igemm_fma<c10::Half>(kind, vec, a);
        break;
      case at::kBFloat16:
        plan.tensor_cores ? conv2d_cuda::igemm_tensor_core<c10::BFloat16>(kind, tile, vec, a)
                          : conv2d_cuda::igemm_fma<c10::BFloat16>(kind, vec, a);
        break;
      case at::kFloat:
        plan.tensor_cores ? conv2d_cuda::igemm_tensor_core<float>(kind, tile, vec, a)
                          : conv2d_cuda::igemm_fma<float>(kind, vec, a);
        break;
      default:
        conv2d_cuda::igemm_fma<double>(kind, vec, a);
        break;
    }
  }
}

// 16-byte vector gathers need whole vectors of channels and aligned base pointers.
bool vectorizable(const Plan& plan, std::initializer_list<int64_t> channel_counts,
                  std::initializer_list<const void*> pointers) {
  const int64_t v = 16 / plan.elem_size;
  for (const int64_t c : channel_counts) {
    if (c % v != 0) return false;
  }
  for (const void* p : pointers) {
    if (!cuda::aligned16(p)) return false;
  }
  return true;
}

at::Tensor nhwc(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

at::Tensor conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "dlext::conv2d";
  const Conv2dGeometry g =
      conv2d_geometry(input, weight, bias, stride, padding, dilation, groups, op);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = new_empty(g.output_sizes(), input.options(), g.memory_format());
  if (out.numel() == 0) return out;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (use_direct(g)) {
    conv2d_cuda::direct_forward(g, input, weight, b, out);
    return out;
  }
  check_igemm_limits(g, op);
  const Plan plan = plan_for(input);
  const at::Tensor x = nhwc(input);
  const at::Tensor w = nhwc(weight);  // K x (R, S, Cg)
  IGemmArgs a = base_args(g);
  a.rows = g.N * g.Ho * g.Wo;
  a.cols = g.Kg;
  a.depth = g.R * g.S * g.Cg;
  a.a = x.const_data_ptr();
  a.b = w.const_data_ptr();
  a.bias = b.defined() ? b.const_data_ptr() : nullptr;
  set_output(a, out);
  const bool vec = vectorizable(plan, {g.Cg}, {a.a, a.b});
  run_igemm(Kind::kForward, plan, choose_tile(a.rows, a.cols, g.groups), vec, a);
  return out;
}

void backward_data(const Conv2dGeometry& g, const Plan& plan, const at::Tensor& dy,
                   const at::Tensor& weight, at::Tensor& dx) {
  // B[j = c][kk = (r, s, k)]: the weight as [G][Cg][R][S][Kg].
  const at::Tensor wt =
      weight.reshape({g.groups, g.Kg, g.Cg, g.R, g.S}).permute({0, 2, 3, 4, 1}).contiguous();
  IGemmArgs a = base_args(g);
  a.rows = g.N * g.H * g.W;
  a.cols = g.Cg;
  a.depth = g.R * g.S * g.Kg;
  a.a = dy.const_data_ptr();
  a.b = wt.const_data_ptr();
  set_output(a, dx);
  const bool vec = vectorizable(plan, {g.Kg}, {a.a, a.b});
  run_igemm(Kind::kBackwardData, plan, choose_tile(a.rows, a.cols, g.groups), vec, a);
}

void backward_weight(const Conv2dGeometry& g, const Plan& plan, const at::Tensor& dy,
                     const at::Tensor& input, at::Tensor& dw) {
  const at::Tensor x = nhwc(input);
  IGemmArgs a = base_args(g);
  a.rows = g.Kg;
  a.cols = g.R * g.S * g.Cg;
  a.depth = g.N * g.Ho * g.Wo;
  a.a = dy.const_data_ptr();
  a.b = x.const_data_ptr();
  const bool vec = vectorizable(plan, {g.Kg, g.Cg}, {a.a, a.b});
  const Tile tile = plan.tensor_cores && vec ? choose_wgrad_tile(a.rows, a.cols) : Tile::k64x64;

  // Split-K: about two blocks per SM, each slice at least 8 depth steps, the float workspace at
  // most 256 MiB.
  const int64_t bk = 64 / plan.elem_size;
  const int64_t ktiles = (a.depth + bk - 1) / bk;
  const int64_t tiles = ((a.rows + tile_rows(tile) - 1) / tile_rows(tile)) *
                        ((a.cols + tile_cols(tile) - 1) / tile_cols(tile)) * g.groups;
  const int64_t acc_size = plan.dtype == at::kDouble ? 8 : 4;
  const int64_t slice_bytes = g.groups * a.rows * a.cols * acc_size;
  int64_t splits = (2 * cuda::sm_count() + tiles - 1) / tiles;
  splits = std::min({splits, std::max<int64_t>(1, ktiles / 8),
                     std::max<int64_t>(1, (int64_t{256} << 20) / slice_bytes), int64_t{4096}});
  a.ktiles_per_split = (ktiles + splits - 1) / splits;
  a.splits = static_cast<int32_t>((ktiles + a.ktiles_per_split - 1) / a.ktiles_per_split);
  set_output(a, dw);
  at::Tensor workspace;
  if (a.splits > 1) {
    workspace = at::empty({a.splits * slice_bytes / acc_size},
                          dy.options().dtype(acc_size == 8 ? at::kDouble : at::kFloat));
    a.workspace = workspace.mutable_data_ptr();
  }
  run_igemm(Kind::kBackwardWeight, plan, tile, vec, a);
  if (a.splits > 1) {
    switch (plan.dtype) {
      case at::kHalf: conv2d_cuda::splitk_reduce<c10::Half>(a); break;
      case at::kBFloat16: conv2d_cuda::splitk_reduce<c10::BFloat16>(a); break;
      case at::kFloat: conv2d_cuda::splitk_reduce<float>(a); break;
      default: conv2d_cuda::splitk_reduce<double>(a); break;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "dlext::conv2d_backward";
  const Conv2dGeometry g =
      conv2d_geometry(input, weight, std::nullopt, stride, padding, dilation, groups, op);
  check_conv2d_grad_output(grad_output, input, g, op);
  const c10::cuda::CUDAGuard guard(input.device());

  // Gradients in the layout of the forward's output; only those asked for.
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = new_empty(input.sizes(), input.options(), g.memory_format());
  if (output_mask[1]) grad_weight = new_empty(weight.sizes(), weight.options(), g.memory_format());
  if (output_mask[2]) grad_bias = new_empty({g.K}, weight.options());
  if (g.empty()) {  // no products at all: grad_input has no elements, the others are zero
    if (grad_weight.defined()) grad_weight.zero_();
    if (grad_bias.defined()) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }

  if (use_direct(g)) {
    if (grad_bias.defined()) {
      conv2d_cuda::bias_backward(grad_output.contiguous(g.memory_format()), grad_bias);
    }
    if (grad_input.defined()) conv2d_cuda::direct_backward_input(g, grad_output, weight, grad_input);
    if (grad_weight.defined()) conv2d_cuda::direct_backward_weight(g, grad_output, input, grad_weight);
    return {grad_input, grad_weight, grad_bias};
  }

  check_igemm_limits(g, op);
  const Plan plan = plan_for(input);
  const at::Tensor dy = nhwc(grad_output);
  if (grad_bias.defined()) conv2d_cuda::bias_backward(dy, grad_bias);
  if (grad_input.defined()) backward_data(g, plan, dy, weight, grad_input);
  if (grad_weight.defined()) backward_weight(g, plan, dy, input, grad_weight);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace dlext

TORCH_LIBRARY_IMPL(dlext, CUDA, m) {
  m.impl("conv2d", &dlext::conv2d_forward_cuda);
  m.impl("conv2d_backward", &dlext::conv2d_backward_cuda);
}
