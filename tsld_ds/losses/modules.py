"""The fused lm_head losses as `nn.Module`s, for any training loop (a plain one, TRL,
torchtune...): hidden states and lm_head in, a scalar loss out, never the [tokens, vocab] logits.

    loss_fn = FusedLinearTSLDLoss(with_gt=True)           # the paper's objective: CE + TSLD
    teacher = TeacherOutput(hidden=teacher_hidden, weight=teacher_model.lm_head.weight)
    loss = loss_fn(student_hidden, student_model.lm_head.weight, labels, teacher)
    loss.backward()

Each is a short subclass of `FusedLinearLoss`, which owns the `Objective` and calls the one
functional entry point, `tsld_ds.losses.fused_linear_loss`.
"""

from torch import Tensor, nn

from .objective import Objective, fused_linear_loss
from .teacher import TeacherOutput


class FusedLinearLoss(nn.Module):
    """An `Objective`'s logit terms by the fused loss. `options`: chunk_size (tokens per chunk),
    vocab_chunk_size (vocabulary entries per block; default the whole vocabulary, one sweep) and
    ignore_index (label of positions to skip, default -100)."""

    def __init__(self, *, soft: str | None, hard: bool, **options):
        super().__init__()
        self.objective = Objective(soft=soft, hard=hard, impl="fused", **options)

    def forward(self, student_hidden: Tensor, lm_head_weight: Tensor, labels: Tensor,
                teacher: TeacherOutput | None = None, *,
                lm_head_bias: Tensor | None = None) -> Tensor:
        """student_hidden [B, L, H] (the final hidden states), the student's lm_head weight
        [V, H] (and bias), labels [B, L] unshifted; the teacher as a `TeacherOutput`."""
        return fused_linear_loss(student_hidden, lm_head_weight, labels, self.objective, teacher,
                                 lm_head_bias=lm_head_bias)["loss"]


class FusedLinearCrossEntropyLoss(FusedLinearLoss):
    """Mean next-token cross-entropy with the labels."""

    def __init__(self, **options):
        super().__init__(soft=None, hard=True, **options)


class FusedLinearLogitKDLoss(FusedLinearLoss):
    """Mean soft cross-entropy -Σ p^T log p^S with the teacher (logit KD), plus the ground-truth
    CE when `with_gt`."""

    def __init__(self, *, with_gt: bool = False, **options):
        super().__init__(soft="logit", hard=with_gt, **options)


class FusedLinearTSLDLoss(FusedLinearLoss):
    """Token-scaled logit distillation (docs/method.md §2), plus the ground-truth CE when
    `with_gt` (the paper's objective). `temperature` τ and `token_scale` set the token weights,
    `reduction` ("sum" over sequences, as published, or "mean") how sequences add up."""

    def __init__(self, *, temperature: float = 10.0, token_scale: str = "confidence",
                 reduction: str = "sum", with_gt: bool = False, **options):
        super().__init__(soft="tsld", hard=with_gt, temperature=temperature,
                         token_scale=token_scale, reduction=reduction, **options)


def fused_linear_tsld_loss(student_hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *,
                           teacher_logits: Tensor | None = None,
                           teacher_hidden: Tensor | None = None,
                           teacher_weight: Tensor | None = None,
                           lm_head_bias: Tensor | None = None,
                           teacher_bias: Tensor | None = None, **options) -> Tensor:
    """The TSLD term of `tsld_loss(student_hidden @ lm_head_weight.T (+ lm_head_bias),
    teacher_logits, labels)` without building the student's (or the teacher's) logits: the
    functional form of `FusedLinearTSLDLoss` (`options`: its keyword arguments). The teacher comes
    as `teacher_logits` [B, L, V] or as `teacher_hidden` [B, L, H_t] with its lm_head
    `teacher_weight` [V, H_t] (and `teacher_bias`)."""
    teacher = TeacherOutput(logits=teacher_logits, hidden=teacher_hidden, weight=teacher_weight,
                            bias=teacher_bias)
    return FusedLinearTSLDLoss(**options)(student_hidden, lm_head_weight, labels, teacher,
                                          lm_head_bias=lm_head_bias)
