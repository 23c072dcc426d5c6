"""Reference distillation losses on full logits: plain PyTorch, written to be obviously right.

All logit losses take unshifted logits [B, L, V] as a causal LM returns them and labels [B, L];
position n is scored on token n + 1 and labels equal to ``ignore_index`` are skipped. Low-precision
logits are upcast to float32. The teacher is a fixed target: no gradient flows into it.
These are the ``--loss_impl naive`` path and the ground truth the fused losses are tested against.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import positions
from .positions import next_token_targets
from .teacher import TeacherTarget, TopKTeacher


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gt_loss(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy with the labels over valid positions (0 if there are none)."""
    targets = next_token_targets(labels, ignore_index)
    total = F.cross_entropy(
        _upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    return total / (targets != ignore_index).sum().clamp_min(1)


def logit_kd_loss(
    student_logits: Tensor, teacher_logits: TeacherTarget, labels: Tensor, *,
    ignore_index: int = -100
) -> Tensor:
    """Mean over valid positions of the soft cross-entropy -Σ_i p^T_i log p^S_i (the K + 1
    bucket form for a `TopKTeacher`)."""
    valid = next_token_targets(labels, ignore_index) != ignore_index
    soft_ce, _ = _soft_and_teacher_ce(student_logits, teacher_logits, labels, ignore_index, None)
    return (soft_ce * valid).sum() / valid.sum().clamp_min(1)


def tsld_loss(
    student_logits: Tensor,
    teacher_logits: TeacherTarget,
    labels: Tensor,
    *,
    temperature: float = 10.0,
    ignore_index: int = -100,
    reduction: str = "sum",
    vocab_chunk: int | None = None,
    token_scale: str = "confidence",
) -> Tensor:
    """Token-scaled logit distillation (the TSLD term only, no ground-truth CE).

    Per sequence: w = softmax over valid positions n of CE^T_n / τ with CE^T_n = -log p^T_n[y_n]
    (detached), TSLD = Σ_n w_n · (-Σ_i p^T_{n,i} log p^S_{n,i}). ``reduction="sum"`` adds the
    sequences (the published implementation); ``"mean"`` divides by the number of sequences with
    a valid position. A `TopKTeacher` gives the K + 1 bucket soft CE and its exact label
    log-probabilities the token scale. ``token_scale`` swaps the weights for an ablation
    (:data:`~tsld_ds.losses.positions.TOKEN_SCALES`: "uniform" w_n = 1/valid positions,
    "inverse" softmax of -CE^T_n / τ).

    ``vocab_chunk`` computes the per-position statistics over vocabulary slices of that width, so
    the float32 temporaries are [B, L, vocab_chunk] instead of [B, L, V]: use it to evaluate large
    vocabularies under ``torch.no_grad()``. (Under autograd every slice is still kept for
    backward; train with the fused loss instead.)
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    valid = next_token_targets(labels, ignore_index) != ignore_index
    soft_ce, teacher_ce = _soft_and_teacher_ce(
        student_logits, teacher_logits, labels, ignore_index, vocab_chunk
    )
    weights = positions.token_scale(teacher_ce, valid, temperature, token_scale)
    total = (weights * soft_ce).sum()  # weights are 0 wherever soft_ce is masked
    if reduction == "mean":
        total = total / valid.any(dim=-1).sum().clamp_min(1)
    return total


def _soft_and_teacher_ce(student_logits, teacher_logits, labels, ignore_index, vocab_chunk):
    """Per position: soft CE -Σ p^T log p^S and the teacher's CE on the target, both [B, L].

    Invalid positions are set to 0: whatever the logits hold there takes no part in the loss.
    """
    targets = next_token_targets(labels, ignore_index)
    valid = targets != ignore_index
    if isinstance(teacher_logits, TopKTeacher):
        soft_ce, teacher_ce = _topk_soft_and_teacher_ce(student_logits, teacher_logits)
        zero = torch.zeros_like(soft_ce)
        return torch.where(valid, soft_ce, zero), torch.where(valid, teacher_ce, zero)
    teacher_logits = teacher_logits.detach()
    if vocab_chunk is None:
        student_logp = torch.log_softmax(_upcast(student_logits), dim=-1)
        teacher_logp = torch.log_softmax(_upcast(teacher_logits), dim=-1)
        soft_ce = -(teacher_logp.exp() * student_logp).sum(dim=-1)
        teacher_ce = -teacher_logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    else:
        soft_ce, teacher_ce = _soft_and_teacher_ce_by_vocab_slices(
            student_logits, teacher_logits, targets.clamp_min(0), vocab_chunk
        )
    zero = torch.zeros_like(soft_ce)
    return torch.where(valid, soft_ce, zero), torch.where(valid, teacher_ce, zero)


def _topk_soft_and_teacher_ce(student_logits: Tensor, teacher: TopKTeacher):
    """The K + 1 bucket soft CE (see `TopKTeacher`) and -target_logprob, [B, L] each."""
    student_logp = torch.log_softmax(_upcast(student_logits), dim=-1)
    ids = teacher.ids.long()
    teacher_p = teacher.logprobs.detach().to(student_logp.dtype).exp()
    if not teacher.has_tail:  # the entries hold all the mass, to the cache's round-off
        teacher_p = teacher_p / teacher_p.sum(dim=-1, keepdim=True)
    soft_ce = -(teacher_p * student_logp.gather(-1, ids)).sum(dim=-1)
    if teacher.has_tail and ids.shape[-1] < student_logits.shape[-1]:  # else there is none
        teacher_tail = (1 - teacher_p.sum(dim=-1)).clamp_min(0)
        student_tail = student_logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
        soft_ce = soft_ce - teacher_tail * student_tail
    return soft_ce, -teacher.target_logprob.detach().to(student_logp.dtype)


def _soft_and_teacher_ce_by_vocab_slices(student_logits, teacher_logits, targets, vocab_chunk):
    """Same statistics as the direct path, one vocabulary slice at a time.

    With the row maxima known up front (a cheap reduction), each slice only adds to three running
    sums: Σ exp(z^S - m^S), Σ exp(z^T - m^T) and Σ exp(z^T - m^T)·(z^S - m^S). Working on
    max-shifted logits keeps the soft CE free of cancellation when |z| is large.
    """
    student_max = student_logits.detach().amax(dim=-1, keepdim=True)
    teacher_max = teacher_logits.amax(dim=-1, keepdim=True)
    student_sum = teacher_sum = teacher_weighted_student = 0
    for start in range(0, student_logits.shape[-1], vocab_chunk):
        student = _upcast(student_logits[..., start : start + vocab_chunk]) - student_max
        teacher = torch.exp(_upcast(teacher_logits[..., start : start + vocab_chunk]) - teacher_max)
        student_sum = student_sum + student.exp().sum(dim=-1)
        teacher_sum = teacher_sum + teacher.sum(dim=-1)
        teacher_weighted_student = teacher_weighted_student + (teacher * student).sum(dim=-1)
    # -Σ p^T log p^S = log Σ exp(z^S - m^S) - Σ p^T (z^S - m^S)
    soft_ce = torch.log(student_sum) - teacher_weighted_student / teacher_sum
    teacher_target = _upcast(teacher_logits.gather(-1, targets.unsqueeze(-1))) - teacher_max
    teacher_ce = torch.log(teacher_sum) - teacher_target.squeeze(-1)
    return soft_ce, teacher_ce


def l2l_loss(
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    student_attentions: Sequence[Tensor] | None = None,
    teacher_attentions: Sequence[Tensor] | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Layer-to-layer distillation (TernaryBERT style): Σ over layers of the MSE between student
    and teacher hidden states [B, L, H], plus Σ over layers of the MSE of attention maps
    [B, heads, L, L] when both are given.

    Pass the tuples a HF model returns with ``output_hidden_states`` / ``output_attentions``
    (hidden states include the embedding output, as TernaryBERT distills it too). With an
    ``attention_mask`` [B, L] (1 = real token) padded positions are left out of every mean; for
    attention maps an entry counts only if both its query and its key are real tokens.
    """
    if len(student_hidden_states) != len(teacher_hidden_states):
        raise ValueError(
            f"{len(student_hidden_states)} student vs {len(teacher_hidden_states)} teacher "
            "hidden states"
        )
    mask = None if attention_mask is None else attention_mask.bool()
    total = sum(
        _masked_mse(s, t, None if mask is None else mask[:, :, None])
        for s, t in zip(student_hidden_states, teacher_hidden_states)
    )
    if (student_attentions is None) != (teacher_attentions is None):
        raise ValueError("give both student and teacher attentions, or neither")
    if student_attentions is not None:
        if len(student_attentions) != len(teacher_attentions):
            raise ValueError(
                f"{len(student_attentions)} student vs {len(teacher_attentions)} teacher attentions"
            )
        pair_mask = None if mask is None else mask[:, None, :, None] & mask[:, None, None, :]
        total = total + sum(
            _masked_mse(s, t, pair_mask) for s, t in zip(student_attentions, teacher_attentions)
        )
    return total


def _masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    squared_error = (_upcast(student) - _upcast(teacher.detach())) ** 2
    if mask is None:
        return squared_error.mean()
    mask = mask.expand_as(squared_error)
    return (squared_error * mask).sum() / mask.sum().clamp_min(1)
