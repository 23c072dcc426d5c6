"""Perplexity of a stand-alone model by training's own method (`tsld_ds.train.evaluate`):
non-overlapping blocks of the packed validation split, summed next-token NLL from the final hidden
states and the lm_head (as training's eval computes it) over all predicted tokens."""
import torch

from tsld_ds.data import load_text_splits, tokenize_and_pack
from tsld_ds.errors import UsageError
from tsld_ds.models import check_plain_lm_head, model_body
from tsld_ds.train.evaluate import perplexity
from tsld_ds.train.student import summed_nll


def validation_blocks(tokenizer, dataset: str, *, dataset_config=None, text_column=None,
                      seed: int = 42, block_size: int = 128):
    try:
        _, val_text = load_text_splits(dataset, dataset_config, text_column=text_column, seed=seed)
        return tokenize_and_pack(val_text, tokenizer, block_size, desc=f"{dataset} validation")
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--dataset {dataset}: {e}") from None


@torch.no_grad()
def model_perplexity(model, blocks, *, batch_size: int = 8, max_blocks: int | None = None) -> float:
    check_plain_lm_head(model, "the model")
    head = model.get_output_embeddings()
    device = head.weight.device
    body = model_body(model)

    def nll(input_ids, labels):
        hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
        return summed_nll(hidden, head.weight, getattr(head, "bias", None), labels)

    return perplexity(nll, blocks, batch_size, device=device, max_blocks=max_blocks)
