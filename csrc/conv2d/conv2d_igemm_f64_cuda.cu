// conv2d implicit-GEMM kernels for float64 (FMA). See conv2d_igemm_cuda.cuh.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "conv2d/conv2d_igemm_cuda.cuh"

namespace dlext {
namespace conv2d_cuda {

template void igemm_fma<double>(Kind, bool, const IGemmArgs&);
template void splitk_reduce<double>(const IGemmArgs&);

}  // namespace conv2d_cuda
}  // namespace dlext
