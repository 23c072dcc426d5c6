"""The training objective behind ``--kd``: one call per micro-batch, fused or naive."""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused import fused_linear_kd_loss
from .reference import gt_loss, l2l_loss, logit_kd_loss, tsld_loss

KD_CHOICES = ("gt", "logit", "logit_gt", "l2l", "tsld")
LOSS_IMPLS = ("fused", "naive")


def distillation_loss(
    kd: str,
    *,
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    lm_head_bias: Optional[Tensor],
    labels: Tensor,
    teacher_logits: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 10.0,
    token_scale: str = "confidence",
    impl: str = "fused",
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
    student_hidden_states: Optional[Sequence[Tensor]] = None,
    teacher_hidden_states: Optional[Sequence[Tensor]] = None,
    student_attentions: Optional[Sequence[Tensor]] = None,
    teacher_attentions: Optional[Sequence[Tensor]] = None,
    attention_mask: Optional[Tensor] = None,
    ignore_index: int = -100,
) -> Dict[str, Tensor]:
    """{"loss": total to backpropagate, and each term, detached, for logging}.

    kd          loss                         terms
    gt          CE with labels               gt
    logit       soft CE (mean)               logit
    logit_gt    soft CE + CE                 logit, gt
    l2l         soft CE + layer-to-layer MSE logit, l2l
    tsld        CE + TSLD (sum over seqs)    gt, tsld

    student_hidden [B, L, H] are the student's final hidden states (after the final norm), with
    its lm_head weight/bias; labels [B, L] unshifted. The teacher comes as teacher_logits or as
    teacher_hidden + teacher_weight (+ teacher_bias); "gt" needs none. impl="fused" never builds
    the [B·L, V] logits (blocks of ``chunk_size`` tokens by ``vocab_chunk_size`` vocabulary
    entries, see :mod:`tsld_ds.losses.fused`); impl="naive" builds them and
    uses the reference losses. For "l2l" the logit part follows ``impl`` too, and the layer MSE
    takes the per-layer hidden states (and attention maps, optional) as the models return them.
    ``temperature`` and ``token_scale`` (TOKEN_SCALES) set the TSLD token weights.
    """
    if kd not in KD_CHOICES:
        raise ValueError(f"kd must be one of {KD_CHOICES}, got {kd!r}")
    if impl not in LOSS_IMPLS:
        raise ValueError(f"impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if kd != "tsld" and token_scale != "confidence":
        raise ValueError(f"token_scale={token_scale!r} weighs the TSLD term: it needs kd='tsld', "
                         f"got kd={kd!r}")
    logit_kd = "logit" if kd == "l2l" else kd
    teacher = {}
    if logit_kd != "gt":
        teacher = dict(
            teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        )
    if impl == "fused":
        out = fused_linear_kd_loss(
            student_hidden, lm_head_weight, labels, kd=logit_kd, lm_head_bias=lm_head_bias,
            temperature=temperature, token_scale=token_scale, ignore_index=ignore_index,
            chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, **teacher,
        )
    else:
        logits = F.linear(student_hidden, lm_head_weight, lm_head_bias)
        out = _naive_kd_loss(logit_kd, logits, labels, temperature, token_scale, ignore_index,
                             **teacher)
    if kd == "l2l":
        if student_hidden_states is None or teacher_hidden_states is None:
            raise ValueError("kd='l2l' needs student_hidden_states and teacher_hidden_states")
        layer_mse = l2l_loss(
            student_hidden_states, teacher_hidden_states, student_attentions, teacher_attentions,
            attention_mask,
        )
        out = {"loss": out["loss"] + layer_mse, "logit": out["logit"], "l2l": layer_mse.detach()}
    return out


def _naive_kd_loss(
    kd, logits, labels, temperature, token_scale, ignore_index,
    teacher_logits=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
) -> Dict[str, Tensor]:
    terms = {}
    if kd in ("gt", "logit_gt", "tsld"):
        terms["gt"] = gt_loss(logits, labels, ignore_index=ignore_index)
    if kd != "gt":
        if (teacher_logits is None) == (teacher_hidden is None):
            raise ValueError(
                "give the teacher as teacher_logits or as teacher_hidden + teacher_weight"
            )
        if teacher_logits is None:
            if teacher_weight is None:
                raise ValueError("teacher_hidden needs teacher_weight (the teacher's lm_head)")
            with torch.no_grad():
                teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
        if kd == "tsld":
            terms["tsld"] = tsld_loss(
                logits, teacher_logits, labels, temperature=temperature, token_scale=token_scale,
                ignore_index=ignore_index,
            )
        else:
            terms["logit"] = logit_kd_loss(
                logits, teacher_logits, labels, ignore_index=ignore_index
            )
    loss = sum(terms.values())
    return {"loss": loss, **{name: term.detach() for name, term in terms.items()}}
