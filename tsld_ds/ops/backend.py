"""Where the Triton kernels run, and why not elsewhere.

The kernels (the repository's kernels/, installed as the subpackage `tsld_ds.kernels`) run on
CUDA tensors of a device of compute capability 8.0 or newer when Triton is installed; everywhere
else each op runs its PyTorch reference. TSLD_DISABLE_KERNELS=1 forces the references. Nothing
here imports Triton: the default (CPU) install has none.
"""

import functools
import importlib.util
import os

import torch

DISABLE_ENV = "TSLD_DISABLE_KERNELS"
# bf16 tensor-core dots and round-to-nearest bf16 conversions (tests compile for sm_80 and sm_90).
MIN_CAPABILITY = (8, 0)


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read by Triton when
    a kernel is defined): the launchers then work around its bf16 (see docs/kernels.md)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    """The installed Triton's version, or None; found without importing it."""
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:  # a source build without metadata
        return "unknown"


def kernel_sources() -> str | None:
    """The directory the kernel modules are imported from."""
    spec = importlib.util.find_spec("tsld_ds.kernels")
    return None if spec is None else list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the kernels cannot run on `device` (default: the current CUDA device), or None."""
    if disabled_by_env():
        return f"disabled by {DISABLE_ENV}"
    if triton_version() is None:
        return "triton not installed"
    if device is None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return f"a {device.type} tensor"
    capability = _capability(device.index if device.index is not None else
                             torch.cuda.current_device())
    if capability < MIN_CAPABILITY:
        return "compute capability %d.%d, the kernels need %d.%d+" % (*capability, *MIN_CAPABILITY)
    return None


def runs_on(tensor: torch.Tensor) -> bool:
    """Whether the kernels run on this tensor's device."""
    return tensor.is_cuda and unavailable_reason(tensor.device) is None


def kernels_info() -> dict:
    """Which implementation the ops (fused_quantize, packed_matmul) use on the current CUDA device
    (if any), and why."""
    reason = unavailable_reason()
    cuda = torch.cuda.is_available()
    backend = "reference" if reason else "triton"
    return {
        "backend": backend,
        "reason": reason,
        "triton": triton_version(),
        "sources": kernel_sources(),
        "device": torch.cuda.get_device_name() if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
    }


def kernels_summary() -> str:
    """One line for --verbose output."""
    info = kernels_info()
    if info["backend"] == "triton":
        return (f"tsld_ds kernels: Triton {info['triton']} on {info['device']} "
                f"(sm_{info['capability'].replace('.', '')})")
    return f"tsld_ds kernels: PyTorch reference ({info['reason']})"
