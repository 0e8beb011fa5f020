// conv2d implicit-GEMM kernels for float32: TF32 tensor cores (mma.sync m16n8k8) when
// TF32 is allowed, exact FMA otherwise. See conv2d_igemm_cuda.cuh.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "conv2d/conv2d_igemm_cuda.cuh"

namespace dlext {
namespace conv2d_cuda {

template void igemm_tensor_core<float>(Kind, Tile, bool, const IGemmArgs&);
template void igemm_fma<float>(Kind, bool, const IGemmArgs&);
template void splitk_reduce<float>(const IGemmArgs&);

}  // namespace conv2d_cuda
}  // namespace dlext
