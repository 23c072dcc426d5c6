"""The CUDA sources travel with the package: a wheel built from this checkout holds them under
tsld_ds/kernel_sources/, and a non-editable install finds them there (kernels_info() names the
directory it would JIT-compile from), so a GPU machine can build the kernels after `pip install .`
even when the wheel was built without CUDA."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

from helpers import REPO


def test_a_non_editable_install_carries_and_finds_the_kernel_sources(tmp_path):
    env = {**os.environ, "TSLD_BUILD_KERNELS": "0", "PIP_NO_INDEX": "1"}
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # Built from a copy: setuptools leaves build/ behind in the source tree it builds.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(source)], env=env, check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("tsld_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("tsld_ds/kernel_sources/") for n in names
               if n.startswith("tsld_ds/kernel_sources/")}
    assert shipped == {p.name for p in (REPO / "kernels").iterdir()
                       if p.suffix in (".cpp", ".cu", ".cuh", ".h")}

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], env=env,
                   check=True, capture_output=True, timeout=300)
    probe = ("import json, tsld_ds; print(json.dumps({'file': tsld_ds.__file__, "
             "**tsld_ds.kernels_info()}))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(site)}, check=True, timeout=120)
    info = json.loads(proc.stdout)
    assert info["file"] == str(site / "tsld_ds" / "__init__.py")  # the installed copy
    assert info["sources"] == str(site / "tsld_ds" / "kernel_sources")
    assert info["aot_build"] is False and info["backend"] == "reference"
