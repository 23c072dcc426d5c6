// Torch binding of the CUDA launchers (tsld_kernels.h). Validates tensors, then launches on the
// stream handle passed from Python (torch.cuda.current_stream(device).cuda_stream), so this file
// needs no CUDA headers. Outputs are allocated by the caller (tsld_ds/ops).
#include <torch/extension.h>

#include "tsld_kernels.h"

namespace {

tsld::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return tsld::DType::kFloat32;
    case at::kHalf: return tsld::DType::kFloat16;
    case at::kBFloat16: return tsld::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(int code) {
  TORCH_CHECK(code == 0, "tsld_ds CUDA kernel failed: ", tsld::error_string(code));
}

void fused_quantize(const at::Tensor& w, at::Tensor& out, const c10::optional<at::Tensor>& stats,
                    int64_t method, int64_t bits, int64_t group_size, int64_t stream) {
  TORCH_CHECK(w.dim() == 2, "weight must be 2-D, got ", w.dim(), "-D");
  check_cuda(w, "weight", w);
  check_cuda(out, "out", w);
  TORCH_CHECK(out.sizes() == w.sizes(), "out must have the weight's shape");
  TORCH_CHECK(method >= 0 && method <= 2, "unknown quantization method ", method);
  float* stats_ptr = nullptr;
  if (stats.has_value()) {
    check_cuda(*stats, "stats", w);
    TORCH_CHECK(stats->scalar_type() == at::kFloat && stats->dim() == 2 && stats->size(1) == 2,
                "stats must be float32 [segments, 2]");
    const int64_t cols = w.size(1);
    const int64_t gs = group_size > 0 && group_size < cols ? group_size : cols;
    const int64_t segments = cols == 0 ? 0 : w.size(0) * ((cols + gs - 1) / gs);
    TORCH_CHECK(stats->size(0) == segments, "stats must have ", segments, " rows");
    stats_ptr = stats->data_ptr<float>();
  }
  check_launch(tsld::fused_quantize(
      w.data_ptr(), dtype_of(w), out.data_ptr(), dtype_of(out), stats_ptr, w.size(0), w.size(1),
      group_size, static_cast<tsld::QuantMethod>(method), static_cast<int>(bits),
      w.get_device(), reinterpret_cast<void*>(stream)));
}

void packed_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias,
                   at::Tensor& out, int64_t bits, int64_t group_size, int64_t stream) {
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && scale.dim() == 2,
              "x, weight_packed and weight_scale must be 2-D");
  check_cuda(x, "x", x);
  check_cuda(packed, "weight_packed", x);
  check_cuda(scale, "weight_scale", x);
  check_cuda(out, "out", x);
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "x must be float16 or bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kInt && scale.scalar_type() == at::kFloat,
              "weight_packed must be int32 and weight_scale float32");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  const int64_t per_word = 32 / bits;
  TORCH_CHECK(packed.size(1) == (K + per_word - 1) / per_word, "weight_packed has ",
              packed.size(1), " words per row, x has K = ", K);
  TORCH_CHECK(group_size <= 0 || group_size % 16 == 0, "group_size must be a multiple of 16");
  const int64_t groups = group_size > 0 ? (K + group_size - 1) / group_size : 1;
  TORCH_CHECK(scale.size(0) == N && scale.size(1) == groups, "weight_scale must be [", N, ", ",
              groups, "]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.dim() == 2 && out.size(0) == M &&
                  out.size(1) == N, "out must be [M, N] in x's dtype");
  const int32_t* zero_ptr = nullptr;
  if (zero.has_value()) {
    check_cuda(*zero, "weight_zero_point", x);
    TORCH_CHECK(zero->scalar_type() == at::kInt && zero->dim() == 2 &&
                    zero->size(0) == (N + per_word - 1) / per_word && zero->size(1) == groups,
                "weight_zero_point must be int32 [ceil(N*bits/32), groups]");
    zero_ptr = zero->data_ptr<int32_t>();
  }
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_cuda(*bias, "bias", x);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == N,
                "bias must be [N] in x's dtype");
    bias_ptr = bias->data_ptr();
  }
  check_launch(tsld::packed_matmul(
      x.data_ptr(), dtype_of(x), packed.data_ptr<int32_t>(), scale.data_ptr<float>(), zero_ptr,
      bias_ptr, out.data_ptr(), M, N, K, static_cast<int>(bits), group_size, x.get_device(),
      reinterpret_cast<void*>(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tsld-ds CUDA kernels: fused weight quantization and packed W2A16/W4A16 matmul";
  m.def("fused_quantize", &fused_quantize, "Fake-quantize a weight (see kernels/tsld_kernels.h)",
        py::arg("weight"), py::arg("out"), py::arg("stats"), py::arg("method"), py::arg("bits"),
        py::arg("group_size"), py::arg("stream"));
  m.def("packed_matmul", &packed_matmul, "x @ W^T (+ bias) with W packed (see tsld_ds/packed/format.py)",
        py::arg("x"), py::arg("weight_packed"), py::arg("weight_scale"),
        py::arg("weight_zero_point"), py::arg("bias"), py::arg("out"), py::arg("bits"),
        py::arg("group_size"), py::arg("stream"));
}
