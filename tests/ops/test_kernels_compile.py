"""Every Triton kernel compiles for Ampere (sm_80) and Hopper (sm_90) without a GPU, in every dtype
and constexpr combination the launchers of tsld_ds.ops dispatch, with the ptxas that ships in
Triton's wheel (tests/ops/compile_kernels.py, in a process without the interpreter); and it
fits: no register spill, shared memory within the SM's limit. The quantize kernels' PTX divides
with correct rounding and has no FMA, which their bit-exactness on a GPU rests on. Run with -s to
see the table of registers, spills and shared memory per kernel. Triton's cache (~/.triton)
serves a rerun."""
import json

import pytest
from helpers import Background

pytest.importorskip("triton")

# Shared memory one block may use (bytes, the opt-in maximum): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def compiled():
    proc = Background.result("compile-kernels")  # tests/ops/compile_kernels.py, begun early
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    print(f"\n{'kernel':40} {'arch':>5} {'regs':>5} {'spill':>6} {'smem B':>7}")
    for r in results:
        print(f"{r['label']:40} sm_{r['arch']} {r['registers']:5} {r['stack'] + r['local']:6} "
              f"{r['shared']:7}")
    return results


def test_every_variant_of_every_kernel_is_compiled(compiled):
    kernels = {r["label"].split()[0] for r in compiled}
    assert kernels == {"quantize", "chunk_partials", "chunk_quantize", "pact_backward", "gemv",
                       "gemm"}
    assert {r["arch"] for r in compiled} == set(SHARED_LIMIT)


def test_no_kernel_spills_or_exceeds_shared_memory(compiled):
    for r in compiled:
        where = f"{r['label']} on sm_{r['arch']}: {r}"
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {where}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"shared memory: {where}"


def test_quantize_kernels_divide_correctly_rounded_without_fma(compiled):
    """Bit-exact Q(W) on a GPU needs IEEE division (torch's on the CPU) and no contraction of a
    multiply and an add: the forward kernels' PTX has only div.rn.f32 and no fma."""
    forward = [r for r in compiled if r["label"].startswith(("quantize", "chunk_quantize"))]
    assert forward
    for r in forward:
        assert r["f32_divisions"] == ["div.rn.f32"], r
        assert not r["fma"], f"{r['label']} on sm_{r['arch']} contracts a multiply-add"
