"""The rows a command reads from a dataset, every rank the same: rank 0 builds (and caches) them
first, and a dataset it cannot read stops every rank with its message."""
import torch.distributed as dist

from tsld_ds.data import check_dataset_source, dataset_rows
from tsld_ds.errors import UsageError


def check_dataset(dataset: str) -> None:
    """What `load_rows` would refuse about the dataset's files, found before any process group
    starts and without reading the data (`tsld_ds.data.check_dataset_source`)."""
    try:
        check_dataset_source(dataset)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--dataset {dataset}: {e}") from None


def load_rows(dataset: str, tokenizer, block_size: int, *, dataset_config: str | None,
              text_column: str | None, seed: int):
    """Tokenized train and validation rows (`tsld_ds.data.dataset_rows`). Rank 0 builds the
    datasets cache first and tells the others whether it worked."""
    def build():
        log = print if dist.get_rank() == 0 else None
        try:
            return dataset_rows(dataset, tokenizer, block_size, dataset_config=dataset_config,
                                text_column=text_column, seed=seed, log=log)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--dataset {dataset}: {e}") from None

    error = [None]
    if dist.get_rank() == 0:
        try:
            rows = build()
        except UsageError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise UsageError(error[0])
    if dist.get_rank() != 0:
        rows = build()
    return rows
