"""The fused loss's building blocks: the online log-sum-exp over vocabulary blocks against
torch.logsumexp (the max growing from block to block, float64), and the slices that cover the
token rows and the vocabulary."""
import pytest
import torch

from tsld_ds.losses.blocks import RunningLogSumExp, chunks, targets_in


def growing_logits(rows=5, vocab=37):
    """Logits whose later entries are larger (each block raises the running max) and large
    (an exp without the max would overflow)."""
    gen = torch.Generator().manual_seed(0)
    return 30 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64) \
        + 40 * torch.arange(vocab, dtype=torch.float64)


@pytest.mark.parametrize("width", [1, 4, 7, 37])
def test_running_log_sum_exp_equals_logsumexp(width):
    logits = growing_logits()
    lse = RunningLogSumExp(len(logits), torch.float64, "cpu")
    for cols in chunks(logits.shape[1], width):
        block = logits[:, cols].clone()
        lse.add_exp_(block)
        # the block is left as its exp relative to the new running max
        torch.testing.assert_close(block, (logits[:, cols] - lse.max[:, None]).exp())
    torch.testing.assert_close(lse.log_sum_exp(), logits.logsumexp(dim=1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("width", [4, 37])
def test_a_first_block_shifted_to_max_zero_starts_the_running_sum(width):
    logits = growing_logits()
    shift = logits[:, :width].amax(dim=1)
    lse = RunningLogSumExp(len(logits), torch.float64, "cpu")
    lse.start_shifted_(logits[:, :width] - shift[:, None])
    for cols in chunks(logits.shape[1], width):
        if cols.start > 0:
            lse.add_exp_(logits[:, cols] - shift[:, None])
    torch.testing.assert_close(lse.log_sum_exp() + shift, logits.logsumexp(dim=1), rtol=1e-14,
                               atol=0)


def test_chunks_cover_the_range_in_order_the_last_one_shorter():
    assert list(chunks(10, 3)) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert list(chunks(4, 8)) == [slice(0, 4)]
    assert list(chunks(0, 8)) == []


def test_targets_in_a_block_give_their_column_or_zero():
    inside, col = targets_in(slice(3, 6), torch.tensor([0, 3, 5, 6, 4]))
    assert inside.tolist() == [False, True, True, False, True]
    assert col.tolist() == [0, 0, 2, 0, 1]
