"""What a training step minimizes (docs/method.md §2), decided once from the options.

`Objective.from_kd(kd)` is the one place that reads `--kd`: it says which terms the loss has
(a soft term, logit KD or TSLD; the ground-truth CE; the layer-to-layer MSE), how the TSLD term
weighs tokens, which implementation computes the logit terms (the fused lm_head loss, or the
reference on full logits) and so what the teacher must hand over. `TeacherOutput` carries the
teacher's side of one micro-batch from its engine to the loss.
"""
from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import fused_linear_loss
from .positions import TOKEN_SCALES
from .reference import TopKTeacher, gt_loss, l2l_loss, logit_kd_loss, tsld_loss

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


@dataclass(frozen=True, eq=False)
class TeacherOutput:
    """The frozen teacher's side of one micro-batch: its `logits` [B, L, V]; or its final
    `hidden` states [B, L, H_t] with its lm_head (`weight` [V, H_t], `bias`), from which the fused
    loss builds the logits one chunk at a time; or its `topk` cache rows (`TopKTeacher`); and
    every block's `hidden_states` and `attentions` for the layer term. It is a fixed target: no
    gradient flows into it."""

    logits: Optional[Tensor] = None
    hidden: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    topk: Optional[TopKTeacher] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None

    def __post_init__(self):
        if sum(t is not None for t in (self.logits, self.hidden, self.topk)) != 1:
            raise ValueError("give the teacher as logits, as hidden states + lm_head weight, or "
                             "as top-k rows")
        if self.hidden is not None and self.weight is None:
            raise ValueError("the teacher's hidden states need its lm_head weight")

    @property
    def vocab_size(self) -> Optional[int]:
        """V, or None for top-k rows (they name token ids, not a vocabulary)."""
        if self.topk is not None:
            return None
        return self.logits.shape[-1] if self.logits is not None else self.weight.shape[0]

    def token_rows(self) -> "TeacherOutput":
        """The same teacher, detached, with its per-token tensors flattened to [B·L, ·]."""
        def rows(t):
            return None if t is None else t.detach().reshape(-1, t.shape[-1])

        topk = None if self.topk is None else self.topk._replace(
            logprobs=rows(self.topk.logprobs), ids=rows(self.topk.ids),
            target_logprob=self.topk.target_logprob.detach().reshape(-1))
        return replace(self, logits=rows(self.logits), hidden=rows(self.hidden), topk=topk,
                       weight=self.weight.detach() if self.weight is not None else None,
                       bias=self.bias.detach() if self.bias is not None else None)

    def soft_target(self):
        """What the reference losses take: [B, L, V] logits (built from the hidden states when
        given those), or the top-k rows."""
        if self.topk is not None:
            return self.topk
        if self.logits is not None:
            return self.logits.detach()
        with torch.no_grad():
            return F.linear(self.hidden, self.weight, self.bias)


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

    soft: Optional[str] = "tsld"
    hard: bool = True
    layers: bool = False
    temperature: float = 10.0
    token_scale: str = "confidence"
    reduction: str = "sum"
    impl: str = "fused"
    chunk_size: Optional[int] = None
    vocab_chunk_size: Optional[int] = None
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
                 teacher: Optional[TeacherOutput] = None, *,
                 lm_head_bias: Optional[Tensor] = None,
                 student_hidden_states: Optional[tuple] = None,
                 student_attentions: Optional[tuple] = None) -> Dict[str, Tensor]:
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
                         teacher: Optional[TeacherOutput]) -> Dict[str, Tensor]:
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
