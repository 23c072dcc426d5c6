"""Compiles every Triton kernel of tsld_ds.kernels for sm_80 and sm_90, in every dtype and
constexpr combination the launchers of tsld_ds.ops dispatch, and prints one JSON line per compile:
registers, stack frame and local memory (where spills go), shared memory, and the float32
divisions and FMAs of its PTX. tests/ops/test_kernels_compile.py runs it and judges the figures.

Each variant is compiled in its generic specialization (no integer argument assumed to be 1 or a
multiple of 16) for both architectures. A launch passes an integer argument that is 1 (one group
per row, one split) as a constant, which a kernel must compile with too: every code path (one
dtype, one block size) is also compiled for sm_90 with every integer argument 1. The compiles run
one after another: on the project's 2 shared cores, two threads or processes were no faster.

It runs in a process of its own: Triton decides when it is imported whether its kernels (its own
standard library's included) are interpreted, and the test suite turns the interpreter on where
there is no GPU.

    TRITON_INTERPRET=0 python tests/ops/compile_kernels.py
"""
import itertools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tsld_ds.kernels import packed_matmul as matmul_kernels  # noqa: E402
from tsld_ds.kernels import quantize as quantize_kernels  # noqa: E402
from tsld_ds.ops import matmul, quantize  # noqa: E402

ARCHES = (80, 90)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TL_TYPES = {torch.float16: triton.language.float16, torch.bfloat16: triton.language.bfloat16}
FLOAT_ARGUMENTS = {"qmax", "n_levels"}


def signature(fn, pointers, constexprs, ones=False):
    """Triton's signature of `fn`: `pointers` maps pointer arguments to element types (None: the
    launcher passes None), constexprs are constants; every other argument a 32-bit scalar, or
    with `ones` each integer one the constant 1 (as Triton specializes a 1)."""
    constexprs = {**constexprs, **{k: None for k, v in pointers.items() if v is None}}
    sig = {}
    for name in fn.arg_names:
        if name in pointers and name not in constexprs:
            sig[name] = "*" + pointers[name]
        elif name in FLOAT_ARGUMENTS:
            sig[name] = "fp32"
        elif name not in constexprs and not ones:
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
            constexprs.setdefault(name, 1)
    return sig, constexprs


def quantize_variants(dtypes=quantize.FLOAT_DTYPES, launches=(quantize.SHORT, quantize.LONG)):
    """(label, kernel, pointer types, constexprs, options) of every launch of ops.quantize."""
    k = quantize_kernels
    methods = {"twn": k.TWN, "absmean": k.ABSMEAN, "minmax": k.MINMAX, "pact": k.PACT}
    options = quantize.OPTIONS
    long = {**quantize.LONG, **options}
    for dtype in dtypes:
        t = TRITON_TYPES[dtype]
        for (name, method), launch in itertools.product(methods.items(), launches):
            pact = "fp32" if name == "pact" else None
            yield (f"quantize {name} {t} B{launch['BLOCK']}", k.quantize_kernel,
                   {"w_ptr": t, "out_ptr": t, "gamma_ptr": pact, "mean_ptr": pact},
                   {"METHOD": method.value, "BLOCK": launch["BLOCK"]}, {**launch, **options})
        for name, method in methods.items():
            pact = "fp32" if name == "pact" else None
            yield (f"chunk_quantize {name} {t}", k.chunk_quantize_kernel,
                   {"w_ptr": t, "out_ptr": t, "gamma_ptr": pact, "mean_ptr": pact,
                    "totals_ptr": "fp32"},
                   {"METHOD": method.value, "BLOCK": quantize.LONG["BLOCK"]}, long)
        for name, stat in {"abs_sum": k.ABS_SUM, "kept": k.KEPT, "min_max": k.MIN_MAX}.items():
            yield (f"chunk_partials {name} {t}", k.chunk_partials_kernel,
                   {"w_ptr": t, "partials_ptr": "fp32",
                    "totals_ptr": "fp32" if name == "kept" else None},
                   {"STAT": stat.value, "BLOCK": quantize.LONG["BLOCK"]}, long)
        for launch in launches:
            yield (f"pact_backward {t} B{launch['BLOCK']}", k.pact_backward_kernel,
                   {"w_ptr": t, "grad_ptr": t, "grad_w_ptr": t, "gamma_ptr": "fp32",
                    "mean_ptr": "fp32", "grad_clip_ptr": "fp32"},
                   {"BLOCK": launch["BLOCK"]}, {**launch, **options})


def matmul_variants(dtypes=matmul.KERNEL_DTYPES, block_ks=matmul.GEMM_BLOCK_K):
    """The same for every launch of ops.matmul."""
    k = matmul_kernels
    for dtype, bits, zero, bias in itertools.product(
            dtypes, matmul.KERNEL_BITS, ("i32", None), (True, False)):
        t = TRITON_TYPES[dtype]
        pointers = {"x_ptr": t, "packed_ptr": "i32", "scale_ptr": "fp32", "zero_ptr": zero,
                    "bias_ptr": t if bias else None, "out_ptr": t}
        label = f"W{bits}A16 {t} {'asym' if zero else 'sym'}{' bias' if bias else ''}"
        yield (f"gemv {label}", k.packed_gemv_kernel,
               {**pointers, "partial_ptr": "fp32", "count_ptr": "i32"},
               {"BITS": bits, **matmul.GEMV}, matmul.GEMV_OPTIONS)
        for block_k in block_ks:
            yield (f"gemm {label} BK{block_k}", k.packed_gemm_kernel, pointers,
                   {"BITS": bits, "DOT_DTYPE": TL_TYPES[dtype], "BLOCK_K": block_k,
                    **matmul.GEMM}, matmul.GEMM_OPTIONS)


def resources(cubin: bytes) -> dict:
    """Registers, stack frame, local memory and static shared memory of the cubin's kernel, by
    the cuobjdump that ships with Triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split())
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]),
            "local": int(fields["LOCAL"]), "static_shared": int(fields["SHARED"])}


def compile_variant(variant, arch, ones=False) -> dict:
    label, fn, pointers, constexprs, options = variant
    sig, consts = signature(fn, pointers, constexprs, ones)
    compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                              options=dict(options))
    found = {"label": label + " ones" * ones, "arch": arch, **resources(compiled.asm["cubin"])}
    found["shared"] = compiled.metadata.shared + found["static_shared"]
    ptx = compiled.asm["ptx"]
    found["f32_divisions"] = sorted(set(re.findall(r"\bdiv(?:\.\w+)*\.f32\b", ptx)))
    found["fma"] = bool(re.search(r"\bfma\.\w+\.f32\b", ptx))
    return found


def main():
    code_paths = [*quantize_variants([torch.float32], [quantize.SHORT]),
                  *matmul_variants([torch.float16], matmul.GEMM_BLOCK_K[:1])]
    jobs = [*itertools.product([*quantize_variants(), *matmul_variants()], ARCHES, [False]),
            *((variant, 90, True) for variant in code_paths)]
    for job in jobs:
        print(json.dumps(compile_variant(*job)), flush=True)


if __name__ == "__main__":
    main()
