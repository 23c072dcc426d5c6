"""W2A16 / W4A16 matmuls in Triton: out = x @ W^T (+ bias) with W read in the compressed-tensors
pack-quantized layout (tsld_ds/packed/format.py) and dequantized in registers only;
tsld_ds.ops.matmul launches them, tsld_ds.packed.format.packed_linear_reference is their
reference.

Layout, for W [N, K] at b bits, P = 32 / b codes per int32 word: code k of row n is the unsigned
u = q + 2^(b-1) at bits [b (k % P), b (k % P) + b) of word k // P of row n of `packed`
[N, ceil(K / P)]; `scale` is float32 [N, G] with group g = k // group_size; asymmetric weights
have zero points packed along N, int32 [ceil(N / P), G], row n's in word n // P of its group's
column. W[n, k] = (u - u_zp) * scale[n, g], u_zp = 2^(b-1) when symmetric (`zero_ptr` None).

- `packed_gemv_kernel` (M = 1, decode): memory-bound, so it streams the packed words with a split
  over K: program (n block, split) reduces its part of K in float32 and stores it; the last split
  of an n block to finish (an atomic counter) adds the parts in split order (the result does not
  depend on timing), adds the bias and stores the output.
- `packed_gemm_kernel` (M > 1): a tile of x times a tile of dequantized codes per K step on the
  tensor cores (`tl.dot`, float32 accumulation), each step's product scaled by its group's scales
  (BLOCK_K divides group_size), so that W is never rounded to 16 bits.
"""
import triton
import triton.language as tl

SCALE_CHUNK: tl.constexpr = tl.constexpr(16)  # group sizes are multiples of it


@triton.jit
def _unpack(words, BITS: tl.constexpr):
    """int32 words [R, C] -> unsigned codes [R, C * 32 / BITS], element j of a word from its bits
    [BITS * j, BITS * j + BITS)."""
    per_word: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, per_word) * BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (words.shape[0], words.shape[1] * per_word))


@triton.jit
def _zero_points(zero_ptr, rows, group, n_groups, mask, BITS: tl.constexpr):
    """Unsigned zero points of `rows` in `group` (int tensors that broadcast together, as does
    `mask`), or the symmetric 2^(b-1) when there are none."""
    per_word: tl.constexpr = 32 // BITS
    if zero_ptr is None:
        zero = tl.full((rows + group).shape, 1 << (BITS - 1), tl.int32)
    else:
        words = tl.load(zero_ptr + (rows // per_word) * n_groups + group, mask=mask, other=0)
        zero = (words >> ((rows % per_word) * BITS)) & ((1 << BITS) - 1)
    return zero


@triton.jit
def packed_gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, partial_ptr,
                       count_ptr, N, K, n_groups, group_size, blocks_per_split, n_splits,
                       BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    per_word: tl.constexpr = 32 // BITS
    words_per_row = tl.cdiv(K, per_word)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # Codes come in chunks of SCALE_CHUNK that share a group (group_size is a multiple of it).
    chunks = tl.arange(0, BLOCK_K // SCALE_CHUNK)
    acc = tl.zeros([BLOCK_N], tl.float32)
    k_begin = split * blocks_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + blocks_per_split * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        cols = k0 // per_word + tl.arange(0, BLOCK_K // per_word)
        words = tl.load(packed_ptr + rows[:, None].to(tl.int64) * words_per_row + cols[None, :],
                        mask=row_mask[:, None] & (cols < words_per_row)[None, :], other=0)
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        groups = (k0 + chunks * SCALE_CHUNK) // group_size  # [BLOCK_K / SCALE_CHUNK]
        group_mask = row_mask[:, None] & (groups < n_groups)[None, :]  # chunks past K: none
        zero = _zero_points(zero_ptr, rows[:, None], groups[None, :], n_groups, group_mask, BITS)
        codes = tl.reshape(_unpack(words, BITS), (BLOCK_N, BLOCK_K // SCALE_CHUNK, SCALE_CHUNK))
        w = (codes - zero[:, :, None]).to(tl.float32)
        part = tl.sum(w * tl.reshape(x, (1, BLOCK_K // SCALE_CHUNK, SCALE_CHUNK)), axis=2)
        scale = tl.load(scale_ptr + rows[:, None] * n_groups + groups[None, :], mask=group_mask,
                        other=0.0)
        acc += tl.sum(part * scale, axis=1)
    tl.store(partial_ptr + split * N + rows, acc, mask=row_mask)
    # Every thread's partial is stored before the counter moves (release); the last split then
    # reads the others' (acquire, bypassing L1) and leaves the counter at 0 for the next launch.
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
        total = tl.zeros([BLOCK_N], tl.float32)
        for s in range(0, n_splits):
            total += tl.load(partial_ptr + s * N + rows, mask=row_mask, other=0.0,
                             cache_modifier=".cg")
        if bias_ptr is not None:
            total += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_mask)
        tl.atomic_xchg(count_ptr + pid_n, 0)


@triton.jit
def packed_gemm_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, M, N, K,
                       n_groups, group_size, BITS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DOT_DTYPE is x's dtype, or float32 where bf16 is emulated wrongly (the interpreter)."""
    per_word: tl.constexpr = 32 // BITS
    words_per_row = tl.cdiv(K, per_word)
    rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rows_m < M, rows_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_m[:, None].to(tl.int64) * K + ks[None, :],
                    mask=m_mask[:, None] & (ks < K)[None, :], other=0.0)
        cols = k0 // per_word + tl.arange(0, BLOCK_K // per_word)
        words = tl.load(packed_ptr + rows_n[:, None].to(tl.int64) * words_per_row + cols[None, :],
                        mask=n_mask[:, None] & (cols < words_per_row)[None, :], other=0)
        group = k0 // group_size
        zero = _zero_points(zero_ptr, rows_n, group, n_groups, n_mask, BITS)
        w = (_unpack(words, BITS) - zero[:, None]).to(DOT_DTYPE)
        part = tl.dot(x.to(DOT_DTYPE), tl.trans(w))
        scale = tl.load(scale_ptr + rows_n * n_groups + group, mask=n_mask, other=0.0)
        acc += part * scale[None, :]
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows_m[:, None].to(tl.int64) * N + rows_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
