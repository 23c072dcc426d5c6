"""Distillation losses: references on full logits and fused lm_head versions that never build them.

Contract names (DESIGN §3): tsld_loss, logit_kd_loss, fused_linear_tsld_loss.
"""
from .distill import KD_CHOICES, LOSS_IMPLS, distillation_loss
from .fused import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_kd_loss,
    fused_linear_tsld_loss,
)
from .positions import TOKEN_SCALES, next_token_targets, token_scale
from .reference import gt_loss, l2l_loss, logit_kd_loss, tsld_loss

__all__ = [
    "KD_CHOICES",
    "LOSS_IMPLS",
    "TOKEN_SCALES",
    "default_chunk_size",
    "distillation_loss",
    "fused_linear_cross_entropy",
    "fused_linear_kd_loss",
    "fused_linear_tsld_loss",
    "gt_loss",
    "l2l_loss",
    "logit_kd_loss",
    "next_token_targets",
    "token_scale",
    "tsld_loss",
]
