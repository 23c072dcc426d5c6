"""Distillation losses: references on full logits and fused lm_head versions that never build them.

Contract names (DESIGN §3): tsld_loss, logit_kd_loss, fused_linear_tsld_loss.
"""
from .positions import next_token_targets, token_scale
from .reference import gt_loss, l2l_loss, logit_kd_loss, tsld_loss

__all__ = [
    "gt_loss",
    "l2l_loss",
    "logit_kd_loss",
    "next_token_targets",
    "token_scale",
    "tsld_loss",
]
