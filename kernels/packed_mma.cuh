// Building blocks of the packed-weight matmuls (packed_matmul.cu): reading packed codes,
// turning them into tensor-core fragments in registers, and per-group scaling.
//
// Weights are the A operand of mma.m16n8k16 (16 weight rows x 16 k) and activations the B
// operand (16 k x 8 activation rows), so one mma serves up to 8 tokens without padding them to
// 16. Fragment ownership (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4*g + t:
//   A reg0: row g,   cols 2t, 2t+1    A reg1: row g+8, cols 2t, 2t+1
//   A reg2: row g,   cols 2t+8, 2t+9  A reg3: row g+8, cols 2t+8, 2t+9
//   B reg0: rows 2t, 2t+1, col g      B reg1: rows 2t+8, 2t+9, col g
//   C: c0, c1 row g, cols 2t, 2t+1;   c2, c3 row g+8, same cols.
// The order of k inside a step is free as long as A and B agree. Lane t takes the physical k
// pairs (kp, kp + d) as logical (2t, 2t+1) and (kp + 1, kp + 1 + d) as (2t+8, 2t+9), with
// d = 16 bits / BITS: the two codes of a pair lie 16 bits apart in one packed word, so one shift
// and one mask put them into the two halves of a register.
#pragma once

#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace tsld {

template <int BITS> struct Packing {
  static_assert(BITS == 2 || BITS == 4, "the packed matmul supports 2- and 4-bit codes");
  static constexpr int kPerWord = 32 / BITS;
  static constexpr int kWordsPerStep = 16 / kPerWord;  // one mma k-step = 16 consecutive k
  static constexpr int kPairDistance = kPerWord / 2;   // d: k distance of a pair's two codes
  static constexpr uint32_t kMask = (1u << BITS) - 1;
  static constexpr uint32_t kPairMask = kMask | (kMask << 16);
  static constexpr int kSymmetricZero = 1 << (BITS - 1);  // stored code of q = 0
};

// Packed words per row loaded at once: one 32-byte sector.
constexpr int kBatchWords = 8;

// Where lane t (= lane % 4) finds its codes inside a k-step.
struct LaneLayout {
  int word;   // which of the step's words (4-bit steps span two)
  int shift;  // bit offset of pair (kp, kp + d) in that word; pair (kp + 1, ...) is BITS higher
  int kp;     // k offset of the lane's first pair within the step
};

template <int BITS> __device__ __forceinline__ LaneLayout lane_layout(int t) {
  if (BITS == 2) return {0, 4 * t, 2 * t};
  return {t >> 1, 8 * (t & 1), 8 * (t >> 1) + 2 * (t & 1)};
}

// The magic-number trick: OR-ing a small integer c into the low mantissa bits of 2^e gives the
// 16-bit float 2^e + c exactly, and subtracting 2^e + z leaves c - z exactly.
template <typename T> struct MmaTraits;
template <> struct MmaTraits<bf16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagicPair = 0x43004300u;  // (128, 128)
  static constexpr float kMagic = 128.f;
  static __device__ __forceinline__ uint16_t bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};
template <> struct MmaTraits<half> {
  using T2 = __half2;
  static constexpr uint32_t kMagicPair = 0x64006400u;  // (1024, 1024)
  static constexpr float kMagic = 1024.f;
  static __device__ __forceinline__ uint16_t bits(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

template <typename To, typename From> __device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between different sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// (magic + zero, magic + zero) as a 16-bit float pair.
template <typename T> __device__ __forceinline__ uint32_t zero_offset(int zero) {
  const uint32_t h = MmaTraits<T>::bits(MmaTraits<T>::kMagic + float(zero));
  return h | (h << 16);
}

// Codes at bits [shift, shift+BITS) and [shift+16, ...) of `word`, minus their zero point, as
// an exact 16-bit float pair (low half first).
template <typename T, int BITS>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int shift, uint32_t offset) {
  using T2 = typename MmaTraits<T>::T2;
  const uint32_t biased = ((word >> shift) & Packing<BITS>::kPairMask) | MmaTraits<T>::kMagicPair;
  return bit_cast<uint32_t>(__hsub2(bit_cast<T2>(biased), bit_cast<T2>(offset)));
}

// c += a * b on the tensor cores with float32 accumulation (sm_80+).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, bf16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host side never launches these kernels below sm_80
#endif
}

// Arguments of both matmul kernels; x, bias and out are 16-bit floats seen as raw bits.
struct MatmulParams {
  const uint16_t* x;       // [M, K]
  const uint32_t* packed;  // [N, KW]
  const float* scale;      // [N, G]
  const uint32_t* zero;    // [ceil(N / per_word), G] or null (symmetric)
  const uint16_t* bias;    // [N] or null
  uint16_t* out;           // [M, N]
  int64_t M, N, K, KW, G;
  int64_t steps;           // k-steps of 16: ceil(KW / words_per_step)
  int64_t steps_per_group; // group_size / 16, or `steps` when one scale per row
  bool vec_w;              // packed rows 16-byte aligned: 8 words load as two uint4
  int x_vec;               // x alignment in elements: 8 (16 bytes), 2 (4 bytes) or 1
};

// Words [8b, 8b+8) of packed row r; zero past the row's end and for rows >= N.
__device__ __forceinline__ void load_batch(uint32_t (&w)[kBatchWords], const MatmulParams& p,
                                           int64_t r, int64_t b) {
  const int64_t first = b * kBatchWords;
  if (r < p.N && p.vec_w && first + kBatchWords <= p.KW) {
    const uint4* src = reinterpret_cast<const uint4*>(p.packed + r * p.KW + first);
    const uint4 lo = __ldg(src), hi = __ldg(src + 1);
    w[0] = lo.x; w[1] = lo.y; w[2] = lo.z; w[3] = lo.w;
    w[4] = hi.x; w[5] = hi.y; w[6] = hi.z; w[7] = hi.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < kBatchWords; ++i)
    w[i] = r < p.N && first + i < p.KW ? __ldg(p.packed + r * p.KW + first + i) : 0u;
}

// The word of step s (within a batch) that a lane reads; `second` picks a 4-bit step's second
// word. Both candidates are compile-time indices, so the array stays in registers.
template <int BITS>
__device__ __forceinline__ uint32_t step_word(const uint32_t (&w)[kBatchWords], int s, int second) {
  constexpr int kW = Packing<BITS>::kWordsPerStep;
  return kW == 1 ? w[s] : (second ? w[kW * s + 1] : w[kW * s]);
}

// Per-lane sums for weight rows r0 (= g) and r1 (= g + 8) of a warp's 16 rows against NT tiles
// of 8 activation rows. Each group's sums are kept unscaled until the group ends, then added
// with its float32 scale, so dequantization inside the mma is exact.
template <typename T, int BITS, int NT> struct RowPairAccumulator {
  float acc[NT][4];
  float total[NT][4];
  int64_t group = -1;
  int64_t group_end = 0;  // first step past the current group
  uint32_t offset[2];     // zero_offset of rows r0, r1 in the current group

  __device__ __forceinline__ RowPairAccumulator() {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = total[j][i] = 0.f;
  }

  __device__ __forceinline__ int stored_zero(const MatmulParams& p, int64_t r, int64_t grp) const {
    if (p.zero == nullptr || r >= p.N) return Packing<BITS>::kSymmetricZero;
    constexpr int kPer = Packing<BITS>::kPerWord;
    const uint32_t word = __ldg(p.zero + (r / kPer) * p.G + grp);
    return int((word >> (BITS * (r % kPer))) & Packing<BITS>::kMask);
  }

  // Adds the finished group's sums times its scales to the totals.
  __device__ __forceinline__ void flush(const MatmulParams& p, int64_t r0, int64_t r1) {
    if (group < 0) return;
    const float s0 = r0 < p.N ? __ldg(p.scale + r0 * p.G + group) : 0.f;
    const float s1 = r1 < p.N ? __ldg(p.scale + r1 * p.G + group) : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      total[j][0] = fmaf(acc[j][0], s0, total[j][0]);
      total[j][1] = fmaf(acc[j][1], s0, total[j][1]);
      total[j][2] = fmaf(acc[j][2], s1, total[j][2]);
      total[j][3] = fmaf(acc[j][3], s1, total[j][3]);
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
    }
  }

  // Accumulates k-step `step`: w0/w1 are the lane's words of rows r0/r1, and
  // load_b(j, b0, b1) yields the B fragment of activation tile j. A thread's steps are
  // consecutive, so after the first one a group boundary means the next group (no division).
  template <typename LoadB>
  __device__ __forceinline__ void step(const MatmulParams& p, int64_t r0, int64_t r1, int64_t step,
                                       uint32_t w0, uint32_t w1, const LaneLayout& lay,
                                       LoadB&& load_b) {
    if (step >= group_end) {
      flush(p, r0, r1);
      group = group < 0 ? step / p.steps_per_group : group + 1;
      group_end = (group + 1) * p.steps_per_group;
      offset[0] = zero_offset<T>(stored_zero(p, r0, group));
      offset[1] = zero_offset<T>(stored_zero(p, r1, group));
    }
    const uint32_t a[4] = {
        dequant_pair<T, BITS>(w0, lay.shift, offset[0]),
        dequant_pair<T, BITS>(w1, lay.shift, offset[1]),
        dequant_pair<T, BITS>(w0, lay.shift + BITS, offset[0]),
        dequant_pair<T, BITS>(w1, lay.shift + BITS, offset[1]),
    };
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t b0, b1;
      load_b(j, b0, b1);
      mma_16816<T>(acc[j], a, b0, b1);
    }
  }
};

// B fragment from two activation pairs (x[k], x[k+1]) and (x[k+d], x[k+d+1]).
__device__ __forceinline__ void pairs_to_b(uint32_t lo, uint32_t hi, uint32_t& b0, uint32_t& b1) {
  b0 = __byte_perm(lo, hi, 0x5410);  // (x[k], x[k+d])
  b1 = __byte_perm(lo, hi, 0x7632);  // (x[k+1], x[k+d+1])
}

}  // namespace tsld
