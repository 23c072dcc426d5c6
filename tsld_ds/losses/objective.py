"""What a training step minimizes (docs/method.md §2), decided once from the options.

`Objective.from_kd(kd)` is the one place that reads `--kd`: it says which terms the loss has
(a soft term, logit KD or TSLD; the ground-truth CE; the layer-to-layer MSE), how the TSLD term
weighs tokens, which implementation computes the logit terms (the fused lm_head loss, or the
reference on full logits) and so what the teacher must hand over (a `TeacherOutput`,
`tsld_ds.losses.teacher`). `fused_linear_loss` is its fused implementation's functional entry
point: the objective's per-token coefficients, summed by the chunk engine of `fused.py`.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import positions
from .fused import RowLoss, default_chunk_size, fused_row_loss
from .positions import TOKEN_SCALES, next_token_targets
from .reference import gt_loss, l2l_loss, logit_kd_loss, tsld_loss
from .teacher import TeacherOutput
from .teacher_forms import TeacherForm, form_of

# --kd -> (soft term, with the ground-truth CE, with the layer-to-layer MSE)
_KD_TERMS = {
    "gt": (None, True, False),
    "logit": ("logit", False, False),
    "logit_gt": ("logit", True, False),
    "l2l": ("logit", False, True),
    "tsld": ("tsld", True, False),
    "tsld_nogt": ("tsld", False, False),  # the token scale judged apart from the GT share
}
KD_CHOICES = tuple(_KD_TERMS)
LOSS_IMPLS = ("fused", "naive")
SOFT_TERMS = ("logit", "tsld")


@dataclass(frozen=True)
class Objective:
    """The loss of a step: Σ of the chosen terms, all over next-token positions.

    soft        None, "logit" (soft CE, mean over tokens) or "tsld" (token-scaled soft CE)
    hard        the ground-truth CE (mean over tokens)
    layers      the layer-to-layer MSE of hidden states and attention maps
    temperature, token_scale, reduction   the TSLD token weights and how sequences add up
    impl        "fused" (lm_head fused, chunked; never [tokens, vocab] logits) or "naive"
    chunk_size, vocab_chunk_size          the fused loss's blocks (default: its own choice)
    """

    soft: str | None = "tsld"
    hard: bool = True
    layers: bool = False
    temperature: float = 10.0
    token_scale: str = "confidence"
    reduction: str = "sum"
    impl: str = "fused"
    chunk_size: int | None = None
    vocab_chunk_size: int | None = None
    ignore_index: int = -100

    def __post_init__(self):
        if self.soft not in (None, *SOFT_TERMS):
            raise ValueError(f"soft term must be one of {SOFT_TERMS} or None, got {self.soft!r}")
        if self.token_scale not in TOKEN_SCALES:
            raise ValueError(f"token scale must be one of {TOKEN_SCALES}, got "
                             f"{self.token_scale!r}")
        if self.token_scale != "confidence" and self.soft != "tsld":
            raise ValueError(f"token scale {self.token_scale!r} weighs the TSLD term; this "
                             "objective has none")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"impl must be one of {LOSS_IMPLS}, got {self.impl!r}")
        for name in ("chunk_size", "vocab_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.soft or self.hard):
            raise ValueError("an objective needs a soft term or the ground-truth CE")

    @classmethod
    def from_kd(cls, kd: str, **options) -> "Objective":
        """The objective of `--kd` (KD_CHOICES); options are the other fields."""
        if kd not in _KD_TERMS:
            raise ValueError(f"kd must be one of {KD_CHOICES}, got {kd!r}")
        soft, hard, layers = _KD_TERMS[kd]
        return cls(soft=soft, hard=hard, layers=layers, **options)

    @property
    def needs_teacher(self) -> bool:
        return self.soft is not None

    @property
    def wants_teacher_logits(self) -> bool:
        """Whether the teacher hands over full logits rather than its hidden states and lm_head
        (the fused path): for the naive path, and with the layer term, whose teacher keeps every
        block's activations anyway (the memory-hungry comparison it is)."""
        return self.needs_teacher and (self.impl == "naive" or self.layers)

    def __call__(self, student_hidden: Tensor, lm_head_weight: Tensor, labels: Tensor,
                 teacher: TeacherOutput | None = None, *,
                 lm_head_bias: Tensor | None = None,
                 student_hidden_states: tuple | None = None,
                 student_attentions: tuple | None = None) -> dict[str, Tensor]:
        """{"loss": the total to backpropagate, and each term, detached, for logging}.

        student_hidden [B, L, H] are the student's final hidden states (after the final norm) and
        lm_head_weight/bias its lm_head; labels [B, L] unshifted. The layer term takes every
        block's hidden states (and attention maps) of student and teacher."""
        if self.impl == "fused":
            terms = fused_linear_loss(student_hidden, lm_head_weight, labels, self, teacher,
                                      lm_head_bias=lm_head_bias)
        else:
            terms = self._reference_terms(F.linear(student_hidden, lm_head_weight, lm_head_bias),
                                          labels, teacher)
        if self.layers:
            if student_hidden_states is None or teacher.hidden_states is None:
                raise ValueError("the layer term needs student and teacher hidden states")
            layer_mse = l2l_loss(student_hidden_states, teacher.hidden_states,
                                 student_attentions, teacher.attentions)
            terms = {**terms, "loss": terms["loss"] + layer_mse, "l2l": layer_mse.detach()}
        return terms

    def _reference_terms(self, logits: Tensor, labels: Tensor,
                         teacher: TeacherOutput | None) -> dict[str, Tensor]:
        """The logit terms by the reference losses on full [B, L, V] logits (`impl="naive"`)."""
        if self.needs_teacher and teacher is None:
            raise ValueError(f"the {self.soft} term needs the teacher's output")
        ignore = self.ignore_index
        terms = {}
        if self.hard:
            terms["gt"] = gt_loss(logits, labels, ignore_index=ignore)
        if self.soft == "tsld":
            terms["tsld"] = tsld_loss(logits, teacher.soft_target(), labels,
                                      temperature=self.temperature, ignore_index=ignore,
                                      reduction=self.reduction, token_scale=self.token_scale)
        elif self.soft == "logit":
            terms["logit"] = logit_kd_loss(logits, teacher.soft_target(), labels,
                                           ignore_index=ignore)
        loss = sum(terms.values())
        return {"loss": loss, **{name: term.detach() for name, term in terms.items()}}


def fused_linear_loss(student_hidden: Tensor, lm_head_weight: Tensor, labels: Tensor,
                      objective: Objective, teacher: TeacherOutput | None = None, *,
                      lm_head_bias: Tensor | None = None) -> dict[str, Tensor]:
    """The logit terms of `objective` (its soft term and ground-truth CE; docs/method.md §2) by
    the fused lm_head loss, as {"loss": differentiable total, term: detached value, ...}, equal
    to the reference losses on `student_hidden @ lm_head_weight.T (+ lm_head_bias)`. Its layer
    term and its `impl` are the caller's (`Objective.__call__` adds the one and chooses this
    function by the other).

    The objective sets each valid token row's coefficients here (docs/method.md §3.1: the mean
    over tokens; TSLD's token scale from the teacher's CE on the label, which its form gives for
    every row first); the chunk engine (`fused.py`) sums the terms with them.

    student_hidden [B, L, H] (unshifted), labels [B, L]; the teacher as in `TeacherOutput`.
    Gradients reach student_hidden, lm_head_weight and lm_head_bias.
    """
    batch, length, hidden_size = student_hidden.shape
    vocab_size = lm_head_weight.shape[0]
    acc_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    targets = next_token_targets(labels, objective.ignore_index)
    valid = targets != objective.ignore_index
    rows = valid.flatten().nonzero().squeeze(1)
    row_targets = targets.flatten()[rows]
    chunk_size = objective.chunk_size or default_chunk_size(vocab_size, hidden_size)
    vocab_chunk_size = objective.vocab_chunk_size or vocab_size
    if objective.soft is not None:
        if teacher is None:
            raise ValueError(f"the {objective.soft} term needs the teacher's output")
        if teacher.vocab_size not in (None, vocab_size):
            raise ValueError(f"teacher vocabulary {teacher.vocab_size} != student vocabulary "
                             f"{vocab_size}")
        teacher = teacher.token_rows()
        form = form_of(teacher, vocab_size)
    else:
        form = TeacherForm

    per_token_mean = torch.full_like(row_targets, 1, dtype=acc_dtype) / max(rows.numel(), 1)
    soft_coef = per_token_mean if objective.soft == "logit" else None
    if objective.soft == "tsld":
        teacher_ce = torch.zeros(batch * length, dtype=acc_dtype, device=rows.device)
        teacher_ce[rows] = form.target_ce(teacher, rows, row_targets, chunk_size,
                                          vocab_chunk_size, acc_dtype)
        weights = positions.token_scale(teacher_ce.view(batch, length), valid,
                                        objective.temperature, objective.token_scale)
        if objective.reduction == "mean":
            weights = weights / valid.any(dim=-1).sum().clamp_min(1)
        soft_coef = weights.flatten()[rows]
    spec = RowLoss(rows, row_targets, soft_coef, per_token_mean if objective.hard else None,
                   form, teacher, chunk_size, vocab_chunk_size)
    loss, soft_total, hard_total = fused_row_loss(
        student_hidden.reshape(batch * length, hidden_size), lm_head_weight, lm_head_bias, spec)
    terms = {"loss": loss}
    if objective.hard:
        terms["gt"] = hard_total.detach()
    if objective.soft is not None:
        terms[objective.soft] = soft_total.detach()
    return terms
