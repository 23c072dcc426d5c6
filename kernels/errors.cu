// Text for the cudaError_t codes that the launchers return.
#include <cuda_runtime.h>

#include "tsld_kernels.h"

namespace tsld {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace tsld
