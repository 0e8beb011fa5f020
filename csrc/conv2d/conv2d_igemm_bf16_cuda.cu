// conv2d implicit-GEMM kernels for bfloat16: tensor cores (mma.sync m16n8k16, float
// accumulators), and the FMA variant for GPUs before sm_80. See conv2d_igemm_cuda.cuh.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "conv2d/conv2d_igemm_cuda.cuh"

namespace dlext {
namespace conv2d_cuda {

template void igemm_tensor_core<c10::BFloat16>(Kind, Tile, bool, const IGemmArgs&);
template void igemm_fma<c10::BFloat16>(Kind, bool, const IGemmArgs&);
template void splitk_reduce<c10::BFloat16>(const IGemmArgs&);

}  // namespace conv2d_cuda
}  // namespace dlext
