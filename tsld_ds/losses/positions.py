"""Which positions a loss counts, and how much: next-token targets and the TSLD token scale.

Shared by the reference and the fused losses so both select and weight positions identically.
"""
import torch
from torch import Tensor


def next_token_targets(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Targets aligned with unshifted logits [B, L, V]: position n is scored on labels[:, n + 1].

    Shifting the labels instead of the logits avoids copying [B, L-1, V] logits (or hidden states);
    the last position has nothing to predict and gets ``ignore_index``.
    """
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


# How TSLD weighs a sequence's tokens by the teacher's CE on the label (--token_scale):
# confidence: the paper's softmax(CE/τ), confident tokens down-weighted; uniform: 1/(valid
# positions), logit KD with TSLD's per-sequence reduction; inverse: softmax(-CE/τ), confident
# tokens up-weighted. The last two are ablations.
TOKEN_SCALES = ("confidence", "uniform", "inverse")


def token_scale(
    teacher_ce: Tensor, valid: Tensor, temperature: float, scale: str = "confidence"
) -> Tensor:
    """TSLD weights [B, L]: w = softmax over each sequence's valid positions of s / τ, with
    s = CE^T (``scale="confidence"``), 0 (``"uniform"``) or -CE^T (``"inverse"``).

    Invalid positions get weight 0 and take no part in the normalization; a sequence without valid
    positions gets all zeros. Masking multiplies by the mask instead of filling -inf, so no
    inf - inf = NaN can arise. The result is a constant (no gradient), as in the paper.
    """
    if scale not in TOKEN_SCALES:
        raise ValueError(f"token scale must be one of {TOKEN_SCALES}, got {scale!r}")
    sign = {"confidence": 1.0, "uniform": 0.0, "inverse": -1.0}[scale]
    # A valid CE is finite, so sign 0 gives exactly 0; invalid positions are masked below.
    scores = torch.where(valid, sign * teacher_ce / temperature, 0.0).detach()
    lowest = torch.full_like(scores, torch.finfo(scores.dtype).min)
    row_max = torch.where(valid, scores, lowest).amax(dim=-1, keepdim=True)  # over valid only
    unnormalized = torch.where(valid, torch.exp(scores - row_max), torch.zeros_like(scores))
    # The row max contributes exp(0) = 1, so a sequence with a valid position sums to >= 1.
    return unnormalized / unnormalized.sum(dim=-1, keepdim=True).clamp_min(1.0)
