"""The Triton kernels install with the package: kernels/ of the checkout is the subpackage
tsld_ds.kernels (tsld_ds/kernels links to it), a wheel built from the checkout carries it there
and a non-editable install runs the kernels from its own copy; and the top-level kernels/ never
shadows the PyPI package `kernels` that transformers imports."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

KERNEL_MODULES = {p.name for p in (REPO / "kernels").glob("*.py")}


def test_the_checkout_imports_its_kernels_as_a_subpackage():
    spec = importlib.util.find_spec("tsld_ds.kernels")
    assert [str(p) for p in spec.submodule_search_locations] == [str(REPO / "tsld_ds" / "kernels")]
    assert (REPO / "tsld_ds" / "kernels").resolve() == REPO / "kernels"
    assert KERNEL_MODULES == {"quantize.py", "packed_matmul.py"}


def test_the_top_level_kernels_directory_shadows_no_package():
    """pytest and launch/*.py put the repository root first on sys.path: a kernels/__init__.py
    would then be what `import kernels` finds."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin is None or REPO / "kernels" not in Path(spec.origin).parents


def test_a_non_editable_install_carries_and_runs_the_kernels(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "PIP_NO_INDEX": "1", "TRITON_INTERPRET": "1"}
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # Built from a copy (links kept): setuptools leaves build/ behind in the tree it builds.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(source)], env=env, check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("tsld_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.removeprefix("tsld_ds/kernels/") for n in names
            if n.startswith("tsld_ds/kernels/")} == KERNEL_MODULES
    assert not any(n.startswith("kernels/") for n in names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], env=env,
                   check=True, capture_output=True, timeout=300)
    probe = """
import json, torch, tsld_ds
from tsld_ds.ops.quantize import fake_quantize
from tsld_ds.quant import QuantConfig
import tsld_ds.kernels.quantize as kernels
wq = fake_quantize(torch.tensor([[1.0, -0.25, 0.5, 0.0]]), QuantConfig(bits=2))
print(json.dumps({"package": tsld_ds.__file__, "kernels": kernels.__file__,
                  "sources": tsld_ds.kernels_info()["sources"], "wq": wq.tolist()}))
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(site)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["package"] == str(site / "tsld_ds" / "__init__.py")  # the installed copy
    assert found["kernels"] == str(site / "tsld_ds" / "kernels" / "quantize.py")
    assert found["sources"] == str(site / "tsld_ds" / "kernels")
    assert found["wq"] == [[0.75, 0.0, 0.75, 0.0]]  # TWN: delta 0.30, alpha mean(1, 0.5)
