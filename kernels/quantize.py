"""Weight fake-quantization in Triton: TWN, absmean, min-max and PACT (docs/method.md §1), whose
PyTorch references are tsld_ds.quant.quantizers; tsld_ds.ops.quantize launches them.

Statistics are taken over *segments*: a row (per channel), a group of a row whose last one may be
shorter (per group), or the whole weight seen as one row (per tensor). `quantize_kernel` runs one
program per segment and fuses the statistics passes with the pass that writes Q(W). A per-tensor
segment is too long for one program, so it is split into chunks: `chunk_partials_kernel` reduces
each chunk, torch adds the chunks' partials, and `chunk_quantize_kernel` writes Q(W) from the
totals.

Everything is computed in float32 with the reference's formulas in its operation order, every
division correctly rounded (`tl.div_rn`, as torch divides on the CPU) and no multiply followed by
an add that the compiler could contract into an FMA: given the same sums, Q(W) is the reference's
bit for bit. Sums are taken in another order than torch's, so with arbitrary inputs they (and what
follows from them) may differ in the last bit.
"""
import triton
import triton.language as tl

# METHOD values.
TWN: tl.constexpr = tl.constexpr(0)
ABSMEAN: tl.constexpr = tl.constexpr(1)
MINMAX: tl.constexpr = tl.constexpr(2)
PACT: tl.constexpr = tl.constexpr(3)
# STAT values of chunk_partials_kernel: what one pass over a chunk reduces.
ABS_SUM: tl.constexpr = tl.constexpr(0)  # sum |w|
KEPT: tl.constexpr = tl.constexpr(1)  # TWN: sum |w| and count over |w| > delta
MIN_MAX: tl.constexpr = tl.constexpr(2)

EPS: tl.constexpr = tl.constexpr(1e-8)  # tsld_ds.quant.quantizers._EPS
TWN_RATIO: tl.constexpr = tl.constexpr(0.7)  # delta = 0.7 * mean|W|


@triton.jit
def rint(x):
    """Round half to even, as torch.round (tl has no rint outside libdevice, which the interpreter
    lacks): below 2^23, adding 2^23 leaves no fraction bits, so the addition rounds to an integer,
    ties to even; from 2^23 up every float32 is an integer already."""
    a = tl.abs(x)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    return tl.where(x < 0, -r, r)


@triton.jit
def _abs_sum(w_ptr, start, length, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, length, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.abs(tl.load(w_ptr + start + offs, mask=offs < length, other=0.0).to(tl.float32))
    return tl.sum(acc, axis=0)


@triton.jit
def _kept_sum_count(w_ptr, start, length, delta, BLOCK: tl.constexpr):
    """TWN's second pass: sum |w| and count where |w| > delta (strictly)."""
    kept_sum = tl.zeros([BLOCK], tl.float32)
    kept = tl.zeros([BLOCK], tl.float32)
    for i in range(0, length, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(w_ptr + start + offs, mask=offs < length, other=0.0).to(tl.float32))
        keep = (a > delta) & (offs < length)
        kept_sum += tl.where(keep, a, 0.0)
        kept += keep.to(tl.float32)
    return tl.sum(kept_sum, axis=0), tl.sum(kept, axis=0)


@triton.jit
def _min_max(w_ptr, start, length, BLOCK: tl.constexpr):
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in range(0, length, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < length
        w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.where(mask, w, float("inf")))
        hi = tl.maximum(hi, tl.where(mask, w, float("-inf")))
    return tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _mean(abs_sum, length):
    # tl.cast: an integer argument equal to 1 reaches the kernel as a constant, not a tensor.
    return tl.div_rn(abs_sum, tl.cast(length, tl.float32))


@triton.jit
def _twn_threshold(abs_sum, length):
    return TWN_RATIO * _mean(abs_sum, length)


@triton.jit
def _twn_alpha(kept_sum, kept):
    return tl.div_rn(kept_sum, tl.maximum(kept, 1.0))  # an all-zero segment keeps nothing: 0


@triton.jit
def _minmax_scale_zero(lo, hi, qmax):
    scale = tl.maximum(tl.div_rn(hi - lo, qmax), EPS)
    return scale, rint(tl.div_rn(-lo, scale))


@triton.jit
def _pact_clip(gamma_ptr, segment, mean):
    return tl.maximum(tl.load(gamma_ptr + segment).to(tl.float32) * mean, EPS)


@triton.jit
def _quantize(w, a, b, qmax, METHOD: tl.constexpr):
    """Q(w) in float32 from the segment's statistics: TWN (alpha, delta), absmean (alpha, -),
    min-max (scale, zero), PACT (clip c, -) with qmax the PACT level count n."""
    if METHOD == TWN:
        wq = tl.where(tl.abs(w) > b, tl.where(w > 0, a, -a), 0.0)
    elif METHOD == ABSMEAN:
        wq = tl.minimum(tl.maximum(rint(tl.div_rn(w, a)), -1.0), 1.0) * a
    elif METHOD == MINMAX:
        wq = (tl.minimum(tl.maximum(rint(tl.div_rn(w, a)) + b, 0.0), qmax) - b) * a
    else:
        levels = rint(tl.div_rn(tl.minimum(tl.maximum(w, -a), a), a) * qmax)
        wq = tl.div_rn(a * levels, qmax)
    return wq


@triton.jit
def _write(w_ptr, out_ptr, start, length, a, b, qmax, METHOD: tl.constexpr, BLOCK: tl.constexpr):
    for i in range(0, length, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < length
        w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        wq = _quantize(w, a, b, qmax, METHOD)
        tl.store(out_ptr + start + offs, wq.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment(n_cols, group_size, groups_per_row):
    """(start, length) of this program's segment in the row-major weight."""
    segment = tl.program_id(0)
    col = (segment % groups_per_row) * group_size
    start = (segment // groups_per_row).to(tl.int64) * n_cols + col
    return start, tl.minimum(group_size, n_cols - col)


@triton.jit
def quantize_kernel(w_ptr, out_ptr, gamma_ptr, mean_ptr, n_cols, group_size, groups_per_row,
                    qmax, METHOD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per segment: its statistics, then Q(W). PACT also stores each segment's
    mean |w| (its backward needs it); qmax is 2^b - 1 for min-max, n = 2^(b-1) - 1 for PACT."""
    start, length = _segment(n_cols, group_size, groups_per_row)
    b = 0.0
    if METHOD == MINMAX:
        lo, hi = _min_max(w_ptr, start, length, BLOCK)
        a, b = _minmax_scale_zero(lo, hi, qmax)
    else:
        abs_sum = _abs_sum(w_ptr, start, length, BLOCK)
        if METHOD == TWN:
            b = _twn_threshold(abs_sum, length)
            kept_sum, kept = _kept_sum_count(w_ptr, start, length, b, BLOCK)
            a = _twn_alpha(kept_sum, kept)
        elif METHOD == ABSMEAN:
            a = tl.maximum(_mean(abs_sum, length), EPS)
        else:
            mean = _mean(abs_sum, length)
            tl.store(mean_ptr + tl.program_id(0), mean)
            a = _pact_clip(gamma_ptr, tl.program_id(0), mean)
    _write(w_ptr, out_ptr, start, length, a, b, qmax, METHOD, BLOCK)


@triton.jit
def _chunk(numel, chunk):
    start = tl.program_id(0).to(tl.int64) * chunk
    return start, tl.minimum(chunk, numel - start)


@triton.jit
def chunk_partials_kernel(w_ptr, partials_ptr, totals_ptr, numel, chunk, STAT: tl.constexpr,
                          BLOCK: tl.constexpr):
    """One pass over a chunk of the flat weight into partials[program, 0:2]: ABS_SUM (sum |w|),
    KEPT (TWN: kept sum and count, with delta from the total sum |w| in totals[0]) or MIN_MAX."""
    start, length = _chunk(numel, chunk)
    out = partials_ptr + 2 * tl.program_id(0)
    if STAT == ABS_SUM:
        tl.store(out, _abs_sum(w_ptr, start, length, BLOCK))
    elif STAT == KEPT:
        delta = _twn_threshold(tl.load(totals_ptr), numel)
        kept_sum, kept = _kept_sum_count(w_ptr, start, length, delta, BLOCK)
        tl.store(out, kept_sum)
        tl.store(out + 1, kept)
    else:
        lo, hi = _min_max(w_ptr, start, length, BLOCK)
        tl.store(out, lo)
        tl.store(out + 1, hi)


@triton.jit
def chunk_quantize_kernel(w_ptr, out_ptr, gamma_ptr, mean_ptr, totals_ptr, numel, chunk, qmax,
                          METHOD: tl.constexpr, BLOCK: tl.constexpr):
    """Q(W) of a chunk of the flat weight from the whole weight's totals: TWN (sum |w|, kept sum,
    kept count), absmean and PACT (sum |w|), min-max (min, max). PACT's program 0 stores the
    mean."""
    start, length = _chunk(numel, chunk)
    b = 0.0
    if METHOD == MINMAX:
        a, b = _minmax_scale_zero(tl.load(totals_ptr), tl.load(totals_ptr + 1), qmax)
    elif METHOD == TWN:
        b = _twn_threshold(tl.load(totals_ptr), numel)
        a = _twn_alpha(tl.load(totals_ptr + 1), tl.load(totals_ptr + 2))
    elif METHOD == ABSMEAN:
        a = tl.maximum(_mean(tl.load(totals_ptr), numel), EPS)
    else:
        mean = _mean(tl.load(totals_ptr), numel)
        if tl.program_id(0) == 0:
            tl.store(mean_ptr, mean)
        a = _pact_clip(gamma_ptr, 0, mean)
    _write(w_ptr, out_ptr, start, length, a, b, qmax, METHOD, BLOCK)


@triton.jit
def pact_backward_kernel(w_ptr, grad_ptr, grad_w_ptr, gamma_ptr, mean_ptr, grad_clip_ptr, n_cols,
                         group_size, groups_per_row, chunk, chunks_per_segment, n_levels,
                         BLOCK: tl.constexpr):
    """PACT's gradients as autograd takes them through the reference, one chunk of a segment per
    program (grid: segments x chunks_per_segment):
        out = (c * l) / n,  l = round_STE(t),  t = (clamp(w, -c, c) / c) * n
    grad_w = where(-c <= w <= c, g_clamp, 0) with g_clamp = (((g / n) * c) * n) / c, op by op as
    autograd rounds it; the program's part of dL/dc, the sum over its elements of
    (g / n) * l  -  ((g / n) * c * n) * ((clamp / c) / c)  -  [w < -c] g_clamp  +  [w > c] g_clamp,
    goes to grad_clip[segment, chunk]; the caller adds the chunks and takes dL/dγ = dL/dc · mean
    where γ·mean >= eps."""
    segment = tl.program_id(0)
    seg_start, seg_length = _segment(n_cols, group_size, groups_per_row)
    offset = tl.program_id(1).to(tl.int64) * chunk
    start = seg_start + offset
    length = tl.minimum(chunk, seg_length - offset)
    c = _pact_clip(gamma_ptr, segment, tl.load(mean_ptr + segment))
    grad_clip = tl.zeros([BLOCK], tl.float32)
    for i in range(0, length, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < length
        w = tl.load(w_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
        clamped = tl.minimum(tl.maximum(w, -c), c)
        levels = rint(tl.div_rn(clamped, c) * n_levels)
        g_levels_in = tl.div_rn(g, n_levels)  # through out = (c * l) / n
        g_ratio = (g_levels_in * c) * n_levels  # through l (straight through) and t = ratio * n
        g_clamp = tl.div_rn(g_ratio, c)  # through ratio = clamp / c
        inside = (w >= -c) & (w <= c)
        tl.store(grad_w_ptr + start + offs, tl.where(inside, g_clamp, 0.0).to(
            grad_w_ptr.dtype.element_ty), mask=mask)
        term = g_levels_in * levels - g_ratio * tl.div_rn(tl.div_rn(clamped, c), c)
        term += tl.where(w > c, g_clamp, 0.0) - tl.where(w < -c, g_clamp, 0.0)
        grad_clip += tl.where(mask, term, 0.0)
    tl.store(grad_clip_ptr + segment * chunks_per_segment + tl.program_id(1),
             tl.sum(grad_clip, axis=0))
