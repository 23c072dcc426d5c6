// C++ entry points of the tsld-ds CUDA kernels. Plain C++ (no CUDA or torch headers) so that
// the torch binding (bindings.cpp) and the kernels (*.cu) compile independently. The packed
// weight layout is the one documented in tsld_ds/packed/format.py.
#pragma once

#include <cstdint>

namespace tsld {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Weight quantizers of tsld_ds.quant that the fused kernel implements.
enum class QuantMethod : int { kTwn = 0, kAbsmean = 1, kMinmax = 2 };

// Every launcher returns a cudaError_t value (0 on success) and runs on `stream` (a
// cudaStream_t) of CUDA device `device`.

// Fake-quantizes w [rows, cols] (row-major, contiguous) into out (same shape) with statistics per
// segment: a row (group_size <= 0) or `group_size` consecutive columns of a row (the last group
// of a row may be shorter). If `stats` is not null it receives two floats per segment, segments
// in row-major order: TWN (alpha, delta), absmean (alpha, 0), min-max (scale, zero).
int fused_quantize(const void* w, DType w_dtype, void* out, DType out_dtype, float* stats,
                   int64_t rows, int64_t cols, int64_t group_size, QuantMethod method, int bits,
                   int device, void* stream);

// out [M, N] = x [M, K] @ W^T (+ bias [N]) with W stored packed (bits 2 or 4): packed [N, KW]
// int32, scale [N, G] float32, zero (null when symmetric) [ceil(N*bits/32), G] int32.
// x, bias and out share dtype (float16 or bfloat16). group_size <= 0 means one scale per row;
// otherwise it must be a multiple of 16. Needs compute capability 8.0 or newer.
int packed_matmul(const void* x, DType dtype, const int32_t* packed, const float* scale,
                  const int32_t* zero, const void* bias, void* out, int64_t M, int64_t N,
                  int64_t K, int bits, int64_t group_size, int device, void* stream);

// Human-readable text of a code returned above.
const char* error_string(int code);

}  // namespace tsld
