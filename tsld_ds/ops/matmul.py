"""W2A16 / W4A16 matmul on packed weights by the Triton kernels of kernels/packed_matmul.py.

`packed_matmul_kernel` runs them on whatever device Triton runs them (CUDA, or the CPU under
TRITON_INTERPRET=1); `packed_matmul` is what the packed Linear layers call: the same where the
kernels run on x's device and take its dtype, else None (the caller then runs the reference,
`tsld_ds.packed.format.packed_linear_reference`).
"""

import functools
import threading

import torch
from torch import Tensor

from .backend import interpreted, runs_on

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_BITS = (2, 4)
GROUP_MULTIPLE = 16  # group sizes the kernels take (the GEMV scales chunks of 16 codes)
# M = 1: BLOCK_N rows per program, BLOCK_K codes per step; the split over K aims at this many
# programs per SM.
GEMV = {"BLOCK_N": 16, "BLOCK_K": 256}
GEMV_OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}
GEMV_PROGRAMS_PER_SM = 4
# M > 1: BLOCK_K divides the group size, so that one step's codes share their scales.
GEMM = {"BLOCK_M": 32, "BLOCK_N": 64}
GEMM_OPTIONS = {"num_warps": 8, "num_stages": 3, "enable_fp_fusion": True}
GEMM_BLOCK_K = (64, 16)  # the largest that divides the group size; both divide per-channel's


def _kernels():
    from tsld_ds.kernels import packed_matmul  # imports Triton: only once a kernel runs

    return packed_matmul


def gemm_block_k(group_size: int | None) -> int:
    return next(b for b in GEMM_BLOCK_K if group_size is None or group_size % b == 0)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_splits(device: torch.device, n: int, k: int) -> int:
    """The split over K of the GEMV: enough programs to fill the device's SMs, no empty split
    (one split outside CUDA, e.g. under the interpreter)."""
    if device.type != "cuda":
        return 1
    k_blocks = -(-k // GEMV["BLOCK_K"])
    n_blocks = -(-n // GEMV["BLOCK_N"])
    wanted = -(-GEMV_PROGRAMS_PER_SM * _multiprocessors(device.index) // n_blocks)
    return max(1, min(wanted, k_blocks))


# The GEMV's per-n-block counters, kept at zero between launches by the kernel itself, one set per
# stream (launches on one stream never overlap).
_counters: dict[tuple[torch.device, int], Tensor] = {}
_counters_lock = threading.Lock()


def _split_counters(device: torch.device, n_blocks: int) -> Tensor:
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    with _counters_lock:
        counters = _counters.get((device, stream))
        if counters is None or counters.numel() < n_blocks:
            counters = torch.zeros(n_blocks, dtype=torch.int32, device=device)
            _counters[(device, stream)] = counters
    return counters


def packed_matmul_kernel(x: Tensor, weight_packed: Tensor, weight_scale: Tensor,
                         weight_zero_point: Tensor | None, bias: Tensor | None, bits: int,
                         group_size: int | None, *, split_k: int | None = None) -> Tensor:
    """x [M, K] (float16/bfloat16, contiguous) @ W^T (+ bias) -> [M, N] in x's dtype, with W given
    by the packed tensors (weight_scale float32; group_size a multiple of 16, or None per channel).
    M = 1 runs the split-K GEMV (`split_k` splits, default: enough to fill the GPU), M > 1 the
    tiled kernel."""
    kernels = _kernels()
    m, k = x.shape
    n, n_groups = weight_scale.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if m == 1:
        splits = split_k or gemv_splits(x.device, n, k)
        k_blocks = max(1, -(-k // GEMV["BLOCK_K"]))
        blocks_per_split = -(-k_blocks // splits)
        splits = -(-k_blocks // blocks_per_split)  # none empty
        n_blocks = -(-n // GEMV["BLOCK_N"])
        partials = torch.empty(splits, n, dtype=torch.float32, device=x.device)
        # Per channel: one group longer than K, so that every code's group is 0.
        group = group_size or k_blocks * GEMV["BLOCK_K"]
        kernels.packed_gemv_kernel[(n_blocks, splits)](
            x, weight_packed, weight_scale, weight_zero_point, bias, out, partials,
            _split_counters(x.device, n_blocks), n, k, n_groups, group, blocks_per_split, splits,
            BITS=bits, **GEMV, **GEMV_OPTIONS)
        return out
    block_k = gemm_block_k(group_size)
    group = group_size or -(-k // block_k) * block_k
    # bf16 under the interpreter: dot in float32 (it multiplies bf16 bit patterns as integers).
    dot_dtype = _triton_dtype(torch.float32 if interpreted() and x.dtype == torch.bfloat16
                              else x.dtype)
    grid = (-(-m // GEMM["BLOCK_M"]), -(-n // GEMM["BLOCK_N"]))
    kernels.packed_gemm_kernel[grid](
        x, weight_packed, weight_scale, weight_zero_point, bias, out, m, n, k, n_groups, group,
        BITS=bits, DOT_DTYPE=dot_dtype, BLOCK_K=block_k, **GEMM, **GEMM_OPTIONS)
    return out


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def packed_matmul(x: Tensor, weight_packed: Tensor, weight_scale: Tensor,
                  weight_zero_point: Tensor | None = None, bias: Tensor | None = None, *,
                  bits: int, group_size: int | None = None) -> Tensor | None:
    """x [..., K] @ W^T (+ bias) -> [..., N] by the kernels where they run on x's device and take
    its dtype (float16/bfloat16; 2 or 4 bits; per channel or groups of a multiple of 16; no
    gradient wanted for x); else None, and the caller runs the reference."""
    applies = (
        runs_on(x)
        and x.dtype in KERNEL_DTYPES
        and bits in KERNEL_BITS
        and (group_size is None or group_size % GROUP_MULTIPLE == 0)
        and not (torch.is_grad_enabled() and x.requires_grad)  # the kernels have no backward
    )
    if not applies:
        return None
    out = packed_matmul_kernel(
        x.reshape(-1, x.shape[-1]).contiguous(), weight_packed.contiguous(),
        weight_scale.float().contiguous(),
        None if weight_zero_point is None else weight_zero_point.contiguous(),
        None if bias is None else bias.to(x.dtype).contiguous(), bits, group_size)
    return out.view(*x.shape[:-1], out.shape[-1])
