"""Finding the compiled kernels: the ahead-of-time build `tsld_ds._kernels` (setup.py, when CUDA
is present), else a just-in-time build of the CUDA sources with torch.utils.cpp_extension (cached
on disk), else none. The sources are the package's own `kernel_sources/` (a wheel or `pip install
.`) or the checkout's `kernels/` (an editable install). Without a build every op runs its PyTorch
reference; which and why is in `kernels_info()`.
"""

import functools
import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Dict, Optional

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "TSLD_DISABLE_KERNELS"
BINDING = "bindings.cpp"
_PACKAGE = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (_PACKAGE / "kernel_sources", _PACKAGE.parent / "kernels")
JIT_NAME = "tsld_ds_kernels"
# The packed matmul uses bf16/fp16 mma.sync tensor-core instructions.
MATMUL_MIN_CAPABILITY = (8, 0)

_lock = threading.Lock()
_loaded: Dict[str, object] = {}  # module, build ("aot" | "jit" | None), reason


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def _build_directory() -> Optional[str]:
    """~/.cache/tsld_ds/torch_extensions/<torch+cuda versions>, unless TORCH_EXTENSIONS_DIR is set
    (then cpp_extension picks its own directory under it)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    tag = f"torch{torch.__version__}_cuda{torch.version.cuda}".replace("+", "_").replace(".", "_")
    path = cache / "tsld_ds" / "torch_extensions" / tag
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def jit_sources(directory: Path) -> list:
    """What the JIT build compiles: the torch binding and every CUDA file beside it, as setup.py's
    ahead-of-time build does."""
    return [directory / BINDING, *sorted(directory.glob("*.cu"))]


def kernel_sources_dir() -> Optional[Path]:
    """The first of SOURCE_DIRS that holds the binding and CUDA sources, or None."""
    for path in SOURCE_DIRS:
        if (path / BINDING).is_file() and any(path.glob("*.cu")):
            return path
    return None


def aot_build_present() -> bool:
    """Whether the ahead-of-time build is installed (found without importing it: no CUDA
    runtime needed)."""
    return importlib.util.find_spec("tsld_ds._kernels") is not None


def _short(error: Exception) -> str:
    limit = 2000
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _load() -> Dict[str, object]:
    if not torch.cuda.is_available():
        return {"module": None, "build": None, "reason": "no CUDA device"}
    try:
        from tsld_ds import _kernels  # built by setup.py

        return {"module": _kernels, "build": "aot", "reason": None}
    except ImportError as error:
        aot_problem = None if isinstance(error, ModuleNotFoundError) else _short(error)
    sources = kernel_sources_dir()
    if sources is None:
        reason = (f"no ahead-of-time build, and no directory of {SOURCE_DIRS} holds the CUDA "
                  f"sources ({BINDING} and *.cu)")
        return {"module": None, "build": None, "reason": reason}
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name=JIT_NAME,
            sources=[str(path) for path in jit_sources(sources)],
            extra_include_paths=[str(sources)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=_build_directory(),
        )
        return {"module": module, "build": "jit", "reason": None}
    except Exception as error:  # any build or import failure means: use the references
        reason = "JIT build failed: " + _short(error)
        if aot_problem:
            reason = f"ahead-of-time build unusable ({aot_problem}); {reason}"
        logger.info("tsld_ds kernels unavailable: %s", reason)
        return {"module": None, "build": None, "reason": reason}


def _state() -> Dict[str, object]:
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.update(_load())
    return _loaded


def extension():
    """The compiled kernel module, or None (use the references)."""
    if disabled_by_env():
        return None
    return _state()["module"]


@functools.lru_cache(maxsize=None)
def matmul_supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= MATMUL_MIN_CAPABILITY


def kernels_info() -> dict:
    """Which implementation each op uses here and why; builds the kernels on first call."""
    if disabled_by_env():
        state = {"module": None, "build": None, "reason": f"disabled by {DISABLE_ENV}"}
    else:
        state = _state()
    cuda = torch.cuda.is_available()
    module = state["module"]
    matmul = module is not None and matmul_supported(torch.device("cuda"))
    sources = kernel_sources_dir()
    info = {
        "backend": "cuda" if module is not None else "reference",
        "build": state["build"],
        "reason": state["reason"],
        # What this install could build from, GPU or not.
        "aot_build": aot_build_present(),
        "sources": None if sources is None else str(sources),
        "device": torch.cuda.get_device_name() if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "ops": {
            "fused_quantize": "cuda" if module is not None else "reference",
            "packed_linear": "cuda" if matmul else "reference",
        },
    }
    if module is not None and not matmul:
        info["reason"] = "packed_linear needs compute capability %d.%d+" % MATMUL_MIN_CAPABILITY
    return info


def kernels_summary() -> str:
    """One line for --verbose output."""
    info = kernels_info()
    if info["backend"] == "cuda":
        text = (f"tsld_ds kernels: CUDA ({info['build']} build, {info['device']}, "
                f"sm_{info['capability']})")
        if info["ops"]["packed_linear"] != "cuda":
            text += f"; packed_linear uses the PyTorch reference: {info['reason']}"
        return text
    return f"tsld_ds kernels: PyTorch reference ({info['reason']})"
