// W2A16 / W4A16 matmul: out = x @ W^T (+ bias) with W read in its packed form and dequantized
// in registers only (see packed_mma.cuh for the fragment scheme).
//
// M <= 16 (decode): packed_gemv_kernel. Memory-bound, so it is built to stream the packed words:
// a block owns 16 weight rows and its 8 warps split K; each warp prefetches the next 32-byte
// sector of its rows while the tensor cores work on the current one; activations come straight
// from global memory (they are small and stay in L1/L2). The warps' partial sums are added in
// shared memory in a fixed order.
// M > 16: packed_gemm_kernel. A block owns 64 weight rows x 32 activation rows; the activation
// tile of each K batch is staged once in shared memory (already in fragment order) and shared
// by the 4 warps, while each warp streams the packed words of its own 16 rows.
#include "packed_mma.cuh"

namespace tsld {
namespace {

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kGemmWarps = 4;
constexpr int kGemmThreads = 32 * kGemmWarps;
constexpr int kGemmTiles = 4;  // 8-row activation tiles per GEMM block

// out[m, row] = v + bias[row], rounded to T; nothing outside [M, N].
template <typename T>
__device__ __forceinline__ void store_out(const MatmulParams& p, int64_t m, int64_t row, float v) {
  if (row >= p.N || m >= p.M) return;
  if (p.bias != nullptr) v += to_float(bit_cast<T>(p.bias[row]));
  p.out[m * p.N + row] = bit_cast<uint16_t>(from_float<T>(v));
}

// Pair (x[m, k], x[m, k+1]) with zeros past the row's end.
__device__ __forceinline__ uint32_t load_x_pair(const MatmulParams& p, const uint16_t* row,
                                                int64_t k) {
  const uint32_t lo = k < p.K ? __ldg(row + k) : 0u;
  const uint32_t hi = k + 1 < p.K ? __ldg(row + k + 1) : 0u;
  return lo | (hi << 16);
}

template <typename T, int BITS, int NT>
__global__ void __launch_bounds__(kGemvThreads) packed_gemv_kernel(const MatmulParams p) {
  using Pk = Packing<BITS>;
  constexpr int kStepsPerBatch = kBatchWords / Pk::kWordsPerStep;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4;
  const LaneLayout lay = lane_layout<BITS>(lane % 4);
  const int64_t r0 = int64_t(blockIdx.x) * 16 + g, r1 = r0 + 8;
  const int64_t m0 = int64_t(blockIdx.y) * 8 * NT;

  const int64_t batches = ceil_div(p.KW, kBatchWords);
  const int64_t per_warp = ceil_div(batches, kGemvWarps);
  const int64_t b_begin = warp * per_warp;
  const int64_t b_end = b_begin + per_warp < batches ? b_begin + per_warp : batches;

  RowPairAccumulator<T, BITS, NT> sums;
  uint32_t cur[2][kBatchWords], next[2][kBatchWords];
  if (b_begin < b_end) {
    load_batch(cur[0], p, r0, b_begin);
    load_batch(cur[1], p, r1, b_begin);
  }
  for (int64_t b = b_begin; b < b_end; ++b) {
    if (b + 1 < b_end) {  // in flight while this batch is multiplied
      load_batch(next[0], p, r0, b + 1);
      load_batch(next[1], p, r1, b + 1);
    }
#pragma unroll
    for (int s = 0; s < kStepsPerBatch; ++s) {
      const int64_t step = b * kStepsPerBatch + s;
      if (step >= p.steps) break;
      const int64_t k = step * 16 + lay.kp;
      sums.step(p, r0, r1, step, step_word<BITS>(cur[0], s, lay.word),
                step_word<BITS>(cur[1], s, lay.word), lay,
                [&](int j, uint32_t& b0, uint32_t& b1) {
                  const int64_t m = m0 + 8 * j + g;
                  if (m >= p.M) { b0 = b1 = 0u; return; }
                  const uint16_t* row = p.x + m * p.K;
                  const int64_t d = Pk::kPairDistance;
                  if (p.x_vec >= 2 && k + d + 1 < p.K) {
                    pairs_to_b(__ldg(reinterpret_cast<const uint32_t*>(row + k)),
                               __ldg(reinterpret_cast<const uint32_t*>(row + k + d)), b0, b1);
                  } else {
                    pairs_to_b(load_x_pair(p, row, k), load_x_pair(p, row, k + d), b0, b1);
                  }
                });
    }
#pragma unroll
    for (int i = 0; i < kBatchWords; ++i) {
      cur[0][i] = next[0][i];
      cur[1][i] = next[1][i];
    }
  }
  sums.flush(p, r0, r1);

  // Sum the warps' partial results: red[warp][tile][c-register][lane].
  __shared__ float red[kGemvWarps * NT * 4 * 32];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[((warp * NT + j) * 4 + i) * 32 + lane] = sums.total[j][i];
  __syncthreads();
  for (int e = threadIdx.x; e < NT * 4 * 32; e += kGemvThreads) {
    const int j = e / 128, i = (e / 32) % 4, ln = e % 32;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) v += red[((w * NT + j) * 4 + i) * 32 + ln];
    const int64_t row = int64_t(blockIdx.x) * 16 + ln / 4 + (i >= 2 ? 8 : 0);
    store_out<T>(p, m0 + 8 * j + 2 * (ln % 4) + (i & 1), row, v);
  }
}

// One 16-k block of an activation row for the GEMM's shared tile: e[j] = (x[k+2j], x[k+2j+1]).
__device__ __forceinline__ void load_x_block(uint32_t (&e)[8], const MatmulParams& p, int64_t m,
                                             int64_t k) {
  if (m >= p.M) {
#pragma unroll
    for (int j = 0; j < 8; ++j) e[j] = 0u;
    return;
  }
  const uint16_t* row = p.x + m * p.K;
  if (p.x_vec == 8 && k + 16 <= p.K) {
    const uint4* src = reinterpret_cast<const uint4*>(row + k);
    const uint4 lo = __ldg(src), hi = __ldg(src + 1);
    e[0] = lo.x; e[1] = lo.y; e[2] = lo.z; e[3] = lo.w;
    e[4] = hi.x; e[5] = hi.y; e[6] = hi.z; e[7] = hi.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) e[j] = load_x_pair(p, row, k + 2 * j);
  }
}

// Stores a 16-k block as 8 words in B-fragment order: words 2t, 2t+1 are lane t's B registers.
template <int BITS>
__device__ __forceinline__ void store_x_block(uint32_t* dst, const uint32_t (&e)[8]) {
  constexpr int kPairWords = Packing<BITS>::kPairDistance / 2;  // d in units of element pairs
  uint32_t f[8];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int a = lane_layout<BITS>(t).kp / 2;
    pairs_to_b(e[a], e[a + kPairWords], f[2 * t], f[2 * t + 1]);
  }
  reinterpret_cast<uint4*>(dst)[0] = make_uint4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<uint4*>(dst)[1] = make_uint4(f[4], f[5], f[6], f[7]);
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kGemmThreads) packed_gemm_kernel(const MatmulParams p) {
  using Pk = Packing<BITS>;
  constexpr int kStepsPerBatch = kBatchWords / Pk::kWordsPerStep;
  constexpr int kBatchK = kBatchWords * Pk::kPerWord;  // 128 (2-bit) or 64 (4-bit)
  constexpr int kRows = 8 * kGemmTiles;
  // Row stride in words; = 8 mod 32 so that the lanes' 8-byte B loads hit distinct banks.
  constexpr int kStride = kBatchK / 2 + 8;
  constexpr int kBlocksPerRow = kBatchK / 16;
  constexpr int kBlocksPerThread = kRows * kBlocksPerRow / kGemmThreads;
  static_assert(kRows * kBlocksPerRow % kGemmThreads == 0, "x tile must split evenly");
  __shared__ __align__(16) uint32_t xs[kRows * kStride];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const LaneLayout lay = lane_layout<BITS>(t);
  const int64_t r0 = int64_t(blockIdx.x) * 16 * kGemmWarps + warp * 16 + g, r1 = r0 + 8;
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  const int64_t batches = ceil_div(p.KW, kBatchWords);

  RowPairAccumulator<T, BITS, kGemmTiles> sums;
  uint32_t cur[2][kBatchWords], next[2][kBatchWords], xblk[kBlocksPerThread][8];
  auto load_x_tile = [&](int64_t b) {
#pragma unroll
    for (int u = 0; u < kBlocksPerThread; ++u) {
      const int unit = threadIdx.x + u * kGemmThreads;
      const int64_t k = b * kBatchK + (unit % kBlocksPerRow) * 16;
      load_x_block(xblk[u], p, m0 + unit / kBlocksPerRow, k);
    }
  };
  if (batches > 0) {
    load_batch(cur[0], p, r0, 0);
    load_batch(cur[1], p, r1, 0);
    load_x_tile(0);
  }
  for (int64_t b = 0; b < batches; ++b) {
    __syncthreads();  // every warp is done reading the previous tile
#pragma unroll
    for (int u = 0; u < kBlocksPerThread; ++u) {
      const int unit = threadIdx.x + u * kGemmThreads;
      uint32_t* dst = xs + (unit / kBlocksPerRow) * kStride + (unit % kBlocksPerRow) * 8;
      store_x_block<BITS>(dst, xblk[u]);
    }
    __syncthreads();
    if (b + 1 < batches) {  // in flight while this batch is multiplied
      load_batch(next[0], p, r0, b + 1);
      load_batch(next[1], p, r1, b + 1);
      load_x_tile(b + 1);
    }
#pragma unroll
    for (int s = 0; s < kStepsPerBatch; ++s) {
      const int64_t step = b * kStepsPerBatch + s;
      if (step >= p.steps) break;
      sums.step(p, r0, r1, step, step_word<BITS>(cur[0], s, lay.word),
                step_word<BITS>(cur[1], s, lay.word), lay,
                [&](int j, uint32_t& b0, uint32_t& b1) {
                  const uint32_t* src = xs + (8 * j + g) * kStride + s * 8 + 2 * t;
                  const uint2 v = *reinterpret_cast<const uint2*>(src);
                  b0 = v.x;
                  b1 = v.y;
                });
    }
#pragma unroll
    for (int i = 0; i < kBatchWords; ++i) {
      cur[0][i] = next[0][i];
      cur[1][i] = next[1][i];
    }
  }
  sums.flush(p, r0, r1);

#pragma unroll
  for (int j = 0; j < kGemmTiles; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      store_out<T>(p, m0 + 8 * j + 2 * t + (i & 1), i < 2 ? r0 : r1, sums.total[j][i]);
}

template <typename T, int BITS>
int launch(const MatmulParams& p, cudaStream_t stream) {
  const int64_t row_blocks = ceil_div(p.N, 16);
  if (p.M <= 16) {
    if (row_blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
    const dim3 grid(static_cast<unsigned>(row_blocks), 1);
    if (p.M <= 8) packed_gemv_kernel<T, BITS, 1><<<grid, kGemvThreads, 0, stream>>>(p);
    else packed_gemv_kernel<T, BITS, 2><<<grid, kGemvThreads, 0, stream>>>(p);
  } else {
    const int64_t n_blocks = ceil_div(p.N, 16 * kGemmWarps);
    const int64_t m_blocks = ceil_div(p.M, 8 * kGemmTiles);
    if (n_blocks > 0x7fffffff || m_blocks > 65535)
      return static_cast<int>(cudaErrorInvalidConfiguration);
    const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>(m_blocks));
    packed_gemm_kernel<T, BITS><<<grid, kGemmThreads, 0, stream>>>(p);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int packed_matmul(const void* x, DType dtype, const int32_t* packed, const float* scale,
                  const int32_t* zero, const void* bias, void* out, int64_t M, int64_t N,
                  int64_t K, int bits, int64_t group_size, int device, void* stream) {
  const bool bad_group = group_size > 0 && group_size % 16 != 0;
  if (M < 0 || N < 0 || K < 0 || (bits != 2 && bits != 4) || bad_group || dtype == DType::kFloat32)
    return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0 || N == 0) return 0;
  MatmulParams p;
  p.x = static_cast<const uint16_t*>(x);
  p.packed = reinterpret_cast<const uint32_t*>(packed);
  p.scale = scale;
  p.zero = reinterpret_cast<const uint32_t*>(zero);
  p.bias = static_cast<const uint16_t*>(bias);
  p.out = static_cast<uint16_t*>(out);
  p.M = M;
  p.N = N;
  p.K = K;
  p.KW = ceil_div(K * bits, 32);
  p.G = group_size > 0 ? ceil_div(K, group_size) : 1;
  p.steps = ceil_div(p.KW, bits / 2);  // 16 / (32 / bits) words per step
  p.steps_per_group = group_size > 0 ? group_size / 16 : (p.steps > 0 ? p.steps : 1);
  p.vec_w = p.KW % 4 == 0 && aligned_to(packed, 16);
  p.x_vec = K % 8 == 0 && aligned_to(x, 16) ? 8 : (K % 2 == 0 && aligned_to(x, 4) ? 2 : 1);
  DeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::kBFloat16) return bits == 2 ? launch<bf16, 2>(p, s) : launch<bf16, 4>(p, s);
  return bits == 2 ? launch<half, 2>(p, s) : launch<half, 4>(p, s);
}

}  // namespace tsld
