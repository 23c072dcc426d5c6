"""What the teacher hands the losses (docs/method.md §2, §2.5): `TeacherOutput`, one micro-batch
of the frozen teacher as its engine or its cache gives it, and `TopKTeacher`, the rows of a top-k
cache. The reference losses and the fused loss both read these; no gradient flows into them."""
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class TopKTeacher(NamedTuple):
    """The teacher as a top-k cache keeps it (docs/method.md §2.5), per position of [B, L]: the
    log-probabilities `logprobs` [B, L, K] of its K most likely tokens `ids` [B, L, K], and
    `target_logprob` [B, L], log p^T of the next-token label (anything where there is none).

    Its soft CE is over K + 1 buckets, the K tokens and the rest: -Σ_{i in S} p^T_i log p^S_i
    - P^T_tail log P^S_tail, with P^T_tail = 1 - Σ_{i in S} p^T_i the teacher's mass outside
    the K tokens and P^S_tail the student's. Its gradient w.r.t. the student's logits is
    p^S - q with q = p^T on the K tokens and the teacher's tail mass spread over the rest in the
    student's proportions. TSLD's token scale uses `target_logprob`, exact.

    With `has_tail` False the entries carry the teacher's whole mass (top k plus tokens sampled
    from its tail, each weighted so the sparse target's expectation is p^T; entries of no mass
    are -inf): the soft CE is -Σ_i q_i log p^S_i over them, q normalized to sum to 1 exactly,
    with no tail bucket."""

    logprobs: Tensor
    ids: Tensor
    target_logprob: Tensor
    has_tail: bool = True


# The teacher of a soft term: full logits [B, L, V], or its top-k cache.
TeacherTarget = Tensor | TopKTeacher


@dataclass(frozen=True, eq=False)
class TeacherOutput:
    """The frozen teacher's side of one micro-batch: its `logits` [B, L, V]; or its final
    `hidden` states [B, L, H_t] with its lm_head (`weight` [V, H_t], `bias`), from which the fused
    loss builds the logits one chunk at a time; or its `topk` cache rows (`TopKTeacher`); and
    every block's `hidden_states` and `attentions` for the layer term. It is a fixed target: no
    gradient flows into it."""

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    topk: TopKTeacher | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None

    def __post_init__(self):
        if sum(t is not None for t in (self.logits, self.hidden, self.topk)) != 1:
            raise ValueError("give the teacher as logits, as hidden states + lm_head weight, or "
                             "as top-k rows")
        if self.hidden is not None and self.weight is None:
            raise ValueError("the teacher's hidden states need its lm_head weight")

    @property
    def vocab_size(self) -> int | None:
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

    def soft_target(self) -> TeacherTarget:
        """What the reference losses take: [B, L, V] logits (built from the hidden states when
        given those), or the top-k rows."""
        if self.topk is not None:
            return self.topk
        if self.logits is not None:
            return self.logits.detach()
        with torch.no_grad():
            return F.linear(self.hidden, self.weight, self.bias)
