"""The training command's loading of rows (`tsld_ds.run.rows.load_rows`, inside the command
shell) run in this process at world size 1, for the data tests of what it refuses."""
import pytest


@pytest.fixture
def training_loads_rows(in_process, builtin_tokenizer, capsys):
    """`load(dataset)`: (exit code, stderr) of the command shell around `load_rows(dataset)`,
    with the datasets library's progress bars off so that stderr is the command's alone."""
    import datasets
    import torch.distributed as dist

    from tsld_ds.run.cli import run_command
    from tsld_ds.run.rows import load_rows

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    datasets.disable_progress_bars()

    def load(dataset) -> tuple[int, str]:
        def work() -> int:
            load_rows(str(dataset), builtin_tokenizer, 32, dataset_config=None,
                      text_column=None, seed=0)
            return 0

        capsys.readouterr()
        return run_command(work), capsys.readouterr().err

    yield load
    datasets.enable_progress_bars()
