"""Which implementation runs where (tsld_ds.ops.backend): the Triton kernels on CUDA, in
QuantLinear and the packed layers; the PyTorch references everywhere else; kernels_info() says
which and why; TSLD_DISABLE_KERNELS=1 forces the references; the default CPU path never imports
Triton. On a GPU also: the layers through the kernels give the references' values and gradients,
and compute-sanitizer's memcheck finds nothing in a small launch of every kernel."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO
from torch import nn

from tsld_ds.ops import backend, fused_quantize, kernels_info, kernels_summary, packed_matmul
from tsld_ds.packed.format import pack_weight
from tsld_ds.packed.linear import PackedInt4Linear
from tsld_ds.quant import QuantConfig, QuantLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_kernels_info_says_what_runs_and_why(monkeypatch):
    info = kernels_info()
    assert {"quantize.py", "packed_matmul.py"} <= {p.name for p in Path(info["sources"]).iterdir()}
    if info["backend"] == "triton":
        assert info["reason"] is None and "Triton" in kernels_summary()
    else:
        expected = "no CUDA device" if info["triton"] else "triton not installed"
        assert info["reason"] == expected and expected in kernels_summary()
    monkeypatch.setenv("TSLD_DISABLE_KERNELS", "1")
    info = kernels_info()
    assert info["backend"] == "reference" and info["reason"] == "disabled by TSLD_DISABLE_KERNELS"
    monkeypatch.delenv("TSLD_DISABLE_KERNELS")
    monkeypatch.setattr(backend, "triton_version", lambda: None)
    assert kernels_info()["reason"] == "triton not installed"


def test_where_the_kernels_do_not_run_the_ops_leave_it_to_the_references(monkeypatch):
    cfg = QuantConfig(bits=2)
    pw = pack_weight(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), 2)
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    assert fused_quantize(torch.randn(4, 8), cfg) is None
    assert packed_matmul(x, pw.weight_packed, pw.weight_scale, bits=2) is None
    if torch.cuda.is_available():
        monkeypatch.setenv("TSLD_DISABLE_KERNELS", "1")
        assert fused_quantize(torch.randn(4, 8, device="cuda"), cfg) is None


def test_the_default_cpu_path_never_imports_triton():
    probe = """
import sys
import torch
from torch import nn
import tsld_ds
from tsld_ds.packed.linear import PackedTernaryLinear
from tsld_ds.quant import QuantConfig, QuantLinear
layer = QuantLinear(nn.Linear(16, 4), QuantConfig(bits=2))
layer(torch.randn(2, 16)).sum().backward()
PackedTernaryLinear(16, 4, dtype=torch.float32)(torch.randn(2, 16))
tsld_ds.kernels_info()
print("triton" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "False"


@cuda
@pytest.mark.parametrize("cfg", [QuantConfig(bits=2),
                                 QuantConfig(bits=4, method="pact", granularity="group",
                                             group_size=32)], ids=["twn", "pact"])
def test_quant_linear_on_cuda_runs_the_kernels_as_the_reference(cfg):
    torch.manual_seed(0)
    dense = nn.Linear(96, 24)
    with torch.no_grad():
        dense.weight.copy_(torch.randint(-512, 513, dense.weight.shape) / 256)
    cpu, gpu = QuantLinear(copy.deepcopy(dense), cfg), QuantLinear(copy.deepcopy(dense), cfg).cuda()
    assert fused_quantize(gpu.weight, cfg, gpu.scale) is not None
    x = torch.randint(-8, 9, (5, 96)) / 8
    grad = torch.randint(-8, 9, (5, 24)) / 8
    cpu(x).backward(grad)
    out = gpu(x.cuda())
    out.backward(grad.cuda())
    torch.testing.assert_close(out.cpu(), cpu(x), rtol=1e-6, atol=1e-6)
    for name, param in cpu.named_parameters():
        torch.testing.assert_close(dict(gpu.named_parameters())[name].grad.cpu(), param.grad,
                                   rtol=1e-5, atol=1e-5, msg=name)


@cuda
def test_packed_layer_on_cuda_runs_the_kernels_as_the_reference():
    pw = pack_weight(torch.randint(-8, 8, (40, 320), dtype=torch.int8),
                     torch.randint(1, 17, (40, 3)) / 256, 4,
                     zero_point=torch.randint(-8, 8, (40, 3), dtype=torch.int8), group_size=128)
    bias = torch.randint(-8, 9, (40,)).to(torch.bfloat16) / 8
    layer = PackedInt4Linear.from_packed(pw, bias=bias)
    x = (torch.randint(-8, 9, (2, 3, 320)) / 8).to(torch.bfloat16)
    assert packed_matmul(x.cuda(), pw.weight_packed.cuda(), pw.weight_scale.cuda(),
                         pw.weight_zero_point.cuda(), bits=4, group_size=128) is not None
    with torch.no_grad():
        expect = layer(x)
        assert torch.equal(layer.cuda()(x.cuda()).cpu(), expect)


SANITIZED_LAUNCHES = """
import torch
from tsld_ds.ops.matmul import packed_matmul_kernel
from tsld_ds.ops.quantize import fake_quantize
from tsld_ds.packed.format import pack_weight
from tsld_ds.quant import QuantConfig
torch.manual_seed(0)
for cfg, shape in [(QuantConfig(bits=2), (5, 3000)),
                   (QuantConfig(bits=4, granularity="group", group_size=48), (7, 100)),
                   (QuantConfig(bits=2, granularity="tensor"), (5, 7000)),
                   (QuantConfig(bits=4, method="pact", granularity="group", group_size=48),
                    (7, 100)),
                   (QuantConfig(bits=4, method="pact", granularity="tensor"), (5, 7000))]:
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scale = (torch.rand(cfg.scale_shape(*shape), device="cuda") + 0.5 if cfg.method == "pact"
             else None)
    fake_quantize(w, cfg, scale).sum().backward()
for bits, group, asymmetric in [(2, None, False), (4, 48, True)]:
    n, k = 37, 300
    groups = 1 if group is None else -(-k // group)
    pw = pack_weight(torch.randint(-1, 2, (n, k), dtype=torch.int8), torch.rand(n, groups), bits,
                     zero_point=torch.zeros(n, groups, dtype=torch.int8) if asymmetric else None,
                     group_size=group)
    tensors = [None if t is None else t.cuda()
               for t in (pw.weight_packed, pw.weight_scale, pw.weight_zero_point)]
    for m, split in [(1, 2), (40, None)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        packed_matmul_kernel(x, *tensors, torch.randn(n, device="cuda", dtype=torch.bfloat16),
                             bits, group, split_k=split)
torch.cuda.synchronize()
"""


@cuda
def test_every_kernel_under_compute_sanitizer_memcheck():
    sanitizer = shutil.which("compute-sanitizer") or str(
        Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer")
    if not Path(sanitizer).is_file():
        pytest.skip("compute-sanitizer not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sanitizer, "--tool=memcheck", "--error-exitcode=97", sys.executable,
                           "-c", SANITIZED_LAUNCHES], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
