"""The benchmark scripts run with benchmarks/ first on sys.path (as `python benchmarks/X.py` puts
it), so none may share a name with an installed package that a library imports: transformers 5.25
imports the `kernels` package, which benchmarks/kernels.py used to shadow."""
from importlib.metadata import packages_distributions

from helpers import REPO


def test_no_script_shadows_an_installed_package():
    installed = packages_distributions()
    clashes = {path.stem: installed[path.stem]
               for path in (REPO / "benchmarks").glob("*.py") if path.stem in installed}
    assert not clashes
