"""The CUDA sources compile without a GPU: every kernels/*.cu with nvcc, and the torch binding
against the installed torch's headers, so a syntax or type error fails CI on CPU machines."""

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

from helpers import REPO
from tsld_ds.ops._extension import jit_sources

KERNELS_DIR = REPO / "kernels"

CU_FILES = sorted(p.name for p in KERNELS_DIR.glob("*.cu"))
# Both language standards torch extensions have been built with (C++17, C++20 since torch 2.10)
# and both architectures the kernels target.
NVCC_BUILDS = {
    "sm80-cxx17": ["-std=c++17", "-gencode", "arch=compute_80,code=sm_80"],
    "sm90-cxx20": ["-std=c++20", "-gencode", "arch=compute_90,code=sm_90"],
}


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


def compile_commands(out_dir: Path):
    """{(source, build): argv} for every compile this machine can run."""
    commands = {}
    nvcc = find_nvcc()
    if nvcc:
        for name in CU_FILES:
            for build, flags in NVCC_BUILDS.items():
                commands[(name, build)] = [
                    nvcc, "-c", str(KERNELS_DIR / name), "-o", str(out_dir / f"{name}.{build}.o"),
                    "-O3", "--Werror", "all-warnings", f"-I{KERNELS_DIR}",
                    *COMMON_NVCC_FLAGS, *flags,
                ]
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx:
        includes = [*include_paths(), sysconfig.get_paths()["include"], str(KERNELS_DIR)]
        commands[("bindings.cpp", "syntax")] = [
            cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=_kernels",
            *(f"-I{p}" for p in includes), str(KERNELS_DIR / "bindings.cpp"),
        ]
    return commands


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs all compiles in parallel once; maps (source, build) to the finished process."""
    commands = compile_commands(tmp_path_factory.mktemp("kernels"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {
            key: pool.submit(subprocess.run, argv, capture_output=True, text=True, timeout=1200)
            for key, argv in commands.items()
        }
        return {key: future.result() for key, future in futures.items()}


def test_jit_build_compiles_what_the_binding_declares():
    """Every kernel entry point the binding declares (tsld_kernels.h) is defined in a .cu file
    that the JIT build compiles: a .cu left out would fail only at import on a GPU."""
    header = (KERNELS_DIR / "tsld_kernels.h").read_text()
    declared = set(re.findall(r"^(?:int|const char\*)\s+(\w+)\s*\(", header, re.M))
    compiled = "".join(p.read_text() for p in jit_sources(KERNELS_DIR) if p.suffix == ".cu")
    assert declared and all(re.search(rf"\b{name}\s*\(", compiled) for name in declared)


@pytest.mark.parametrize("build", NVCC_BUILDS)
@pytest.mark.parametrize("source", CU_FILES)
def test_cuda_source_compiles(compiled, source, build):
    if find_nvcc() is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin")
    proc = compiled[(source, build)]
    assert proc.returncode == 0, f"nvcc {source} ({build}) failed:\n{proc.stderr[-8000:]}"


def test_torch_binding_compiles(compiled):
    if ("bindings.cpp", "syntax") not in compiled:
        pytest.skip("no C++ compiler (c++ or $CXX) found")
    proc = compiled[("bindings.cpp", "syntax")]
    assert proc.returncode == 0, f"bindings.cpp failed to compile:\n{proc.stderr[-8000:]}"
