// Fused weight fake-quantization for QAT: one pass per statistic over each segment (a row or a
// group of a row), then one pass writing the quantized weight, instead of PyTorch's chain of
// elementwise ops. The formulas and their float32 operation order are those of
// tsld_ds/quant/quantizers.py, so given the same statistics the output is bit-identical
// (min-max statistics are exact; sums may differ from torch's in the last bit of fp32).
#include "common.cuh"

namespace tsld {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kEps = 1e-8f;        // tsld_ds.quant.quantizers._EPS
constexpr float kTwnRatio = 0.7f;    // TWN threshold: delta = 0.7 * mean|W|
constexpr int64_t kWarpSegmentMax = 1024;  // longer segments are reduced by a whole block

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

struct Sum { __device__ float operator()(float a, float b) const { return a + b; } };
struct Min { __device__ float operator()(float a, float b) const { return fminf(a, b); } };
struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// Reduces v over a team of `team_warps` warps (1, or the whole block); every thread of the team
// gets the result. The combination order is fixed, so the result is deterministic.
template <typename Op>
__device__ float team_reduce(float v, Op op, int team_warps, float* smem) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (team_warps == 1) return v;
  __syncthreads();  // the previous reduction may still be reading smem
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  float r = smem[0];
  for (int i = 1; i < team_warps; ++i) r = op(r, smem[i]);
  return r;
}

// Calls f(value) for each element of the segment that this team thread owns.
template <int VEC, typename Tin, typename F>
__device__ void for_each(const Tin* src, int64_t len, int tid, int team, F&& f) {
  for (int64_t i = int64_t(tid) * VEC; i < len; i += int64_t(team) * VEC) {
    const Vec<Tin, VEC> v = *reinterpret_cast<const Vec<Tin, VEC>*>(src + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f(to_float(v.v[j]));
  }
}

// dst[i] = f(src[i]) over the segment, VEC elements per access.
template <int VEC, typename Tin, typename Tout, typename F>
__device__ void map_segment(const Tin* src, Tout* dst, int64_t len, int tid, int team, F&& f) {
  for (int64_t i = int64_t(tid) * VEC; i < len; i += int64_t(team) * VEC) {
    const Vec<Tin, VEC> v = *reinterpret_cast<const Vec<Tin, VEC>*>(src + i);
    Vec<Tout, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<Tout>(f(to_float(v.v[j])));
    *reinterpret_cast<Vec<Tout, VEC>*>(dst + i) = o;
  }
}

// One segment per team: a warp (team_warps == 1, eight segments per block) or the block.
template <typename Tin, typename Tout, QuantMethod METHOD, int VEC>
__global__ void __launch_bounds__(kThreads)
fused_quantize_kernel(const Tin* __restrict__ w, Tout* __restrict__ out, float* __restrict__ stats,
                      int64_t rows, int64_t cols, int64_t group_size, int64_t groups_per_row,
                      int team_warps, float qmax) {
  __shared__ float smem[kWarps];
  const int team = 32 * team_warps;
  const int64_t seg = team_warps == 1 ? int64_t(blockIdx.x) * kWarps + threadIdx.x / 32
                                      : int64_t(blockIdx.x);
  if (seg >= rows * groups_per_row) return;  // whole warps only: no barrier is skipped
  const int tid = threadIdx.x % team;
  const int64_t begin = (seg % groups_per_row) * group_size;
  const int64_t len = cols - begin < group_size ? cols - begin : group_size;
  const int64_t offset = (seg / groups_per_row) * cols + begin;
  const Tin* src = w + offset;
  Tout* dst = out + offset;

  float stat0, stat1;
  if constexpr (METHOD == QuantMethod::kMinmax) {
    float lo = INFINITY, hi = -INFINITY;
    for_each<VEC>(src, len, tid, team, [&](float v) { lo = fminf(lo, v); hi = fmaxf(hi, v); });
    lo = team_reduce(lo, Min{}, team_warps, smem);
    hi = team_reduce(hi, Max{}, team_warps, smem);
    const float scale = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), qmax), kEps);
    const float zero = rintf(__fdiv_rn(-lo, scale));
    stat0 = scale;
    stat1 = zero;
    map_segment<VEC>(src, dst, len, tid, team, [=](float v) {
      const float q = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(v, scale)), zero), 0.f), qmax);
      return __fmul_rn(__fsub_rn(q, zero), scale);
    });
  } else {
    float sum = 0.f;
    for_each<VEC>(src, len, tid, team, [&](float v) { sum += fabsf(v); });
    const float mean = __fdiv_rn(team_reduce(sum, Sum{}, team_warps, smem), float(len));
    if constexpr (METHOD == QuantMethod::kTwn) {
      const float delta = __fmul_rn(kTwnRatio, mean);
      float kept_sum = 0.f, kept = 0.f;
      for_each<VEC>(src, len, tid, team, [&](float v) {
        if (fabsf(v) > delta) { kept_sum += fabsf(v); kept += 1.f; }
      });
      kept_sum = team_reduce(kept_sum, Sum{}, team_warps, smem);
      kept = team_reduce(kept, Sum{}, team_warps, smem);
      const float alpha = __fdiv_rn(kept_sum, fmaxf(kept, 1.f));  // all-zero segment: alpha = 0
      stat0 = alpha;
      stat1 = delta;
      map_segment<VEC>(src, dst, len, tid, team,
                       [=](float v) { return fabsf(v) > delta ? copysignf(alpha, v) : 0.f; });
    } else {
      const float alpha = fmaxf(mean, kEps);
      stat0 = alpha;
      stat1 = 0.f;
      map_segment<VEC>(src, dst, len, tid, team, [=](float v) {
        return __fmul_rn(alpha, fminf(fmaxf(rintf(__fdiv_rn(v, alpha)), -1.f), 1.f));
      });
    }
  }
  if (stats != nullptr && tid == 0) {
    stats[2 * seg] = stat0;
    stats[2 * seg + 1] = stat1;
  }
}

template <typename Tin, typename Tout, QuantMethod METHOD>
int launch(const Tin* w, Tout* out, float* stats, int64_t rows, int64_t cols, int64_t group_size,
           int bits, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(Tin);
  const int64_t groups = ceil_div(cols, group_size);
  const int64_t segments = rows * groups;
  const int team_warps = group_size <= kWarpSegmentMax ? 1 : kWarps;
  const int64_t blocks = team_warps == 1 ? ceil_div(segments, kWarps) : segments;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  const bool vec = cols % kVec == 0 && group_size % kVec == 0 && aligned_to(w, 16) &&
                   aligned_to(out, kVec * sizeof(Tout));
  const float qmax = float((1 << bits) - 1);
  if (vec) {
    fused_quantize_kernel<Tin, Tout, METHOD, kVec><<<unsigned(blocks), kThreads, 0, stream>>>(
        w, out, stats, rows, cols, group_size, groups, team_warps, qmax);
  } else {
    fused_quantize_kernel<Tin, Tout, METHOD, 1><<<unsigned(blocks), kThreads, 0, stream>>>(
        w, out, stats, rows, cols, group_size, groups, team_warps, qmax);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename Tin, typename Tout>
int launch_method(QuantMethod method, const void* w, void* out, float* stats, int64_t rows,
                  int64_t cols, int64_t group_size, int bits, cudaStream_t stream) {
  auto in = static_cast<const Tin*>(w);
  auto o = static_cast<Tout*>(out);
  switch (method) {
    case QuantMethod::kTwn:
      return launch<Tin, Tout, QuantMethod::kTwn>(in, o, stats, rows, cols, group_size, bits,
                                                  stream);
    case QuantMethod::kAbsmean:
      return launch<Tin, Tout, QuantMethod::kAbsmean>(in, o, stats, rows, cols, group_size, bits,
                                                      stream);
    case QuantMethod::kMinmax:
      return launch<Tin, Tout, QuantMethod::kMinmax>(in, o, stats, rows, cols, group_size, bits,
                                                     stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int fused_quantize(const void* w, DType w_dtype, void* out, DType out_dtype, float* stats,
                   int64_t rows, int64_t cols, int64_t group_size, QuantMethod method, int bits,
                   int device, void* stream) {
  if (rows < 0 || cols < 0 || bits < 2 || bits > 8) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0 || cols == 0) return 0;
  // A group as wide as the row (or wider) is the per-row case.
  const int64_t gs = group_size > 0 && group_size < cols ? group_size : cols;
  DeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  // Weights are quantized in their own dtype, or from float32 master weights into any dtype.
  if (w_dtype != DType::kFloat32 && out_dtype != w_dtype)
    return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_dtype(out_dtype, [&](auto out_tag) {
    using Tout = typename decltype(out_tag)::type;
    if (w_dtype == DType::kFloat32)
      return launch_method<float, Tout>(method, w, out, stats, rows, cols, gs, bits, s);
    return launch_method<Tout, Tout>(method, w, out, stats, rows, cols, gs, bits, s);
  });
}

}  // namespace tsld
