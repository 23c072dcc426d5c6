"""Distillation losses (docs/method.md §2-3): the training `Objective`, the fused lm_head loss that
never builds [tokens, vocab] logits (functional and `nn.Module` forms), and the plain-PyTorch
references it is tested against."""
from .fused import default_chunk_size
from .modules import (
    FusedLinearCrossEntropyLoss,
    FusedLinearLogitKDLoss,
    FusedLinearLoss,
    FusedLinearTSLDLoss,
    fused_linear_tsld_loss,
)
from .objective import KD_CHOICES, LOSS_IMPLS, Objective, fused_linear_loss
from .positions import TOKEN_SCALES, next_token_targets, token_scale
from .reference import gt_loss, l2l_loss, logit_kd_loss, tsld_loss
from .teacher import TeacherOutput, TopKTeacher
from .teacher_forms import topk_with_sampled_tail

__all__ = [
    "KD_CHOICES",
    "LOSS_IMPLS",
    "TOKEN_SCALES",
    "FusedLinearCrossEntropyLoss",
    "FusedLinearLogitKDLoss",
    "FusedLinearLoss",
    "FusedLinearTSLDLoss",
    "Objective",
    "TeacherOutput",
    "TopKTeacher",
    "default_chunk_size",
    "fused_linear_loss",
    "fused_linear_tsld_loss",
    "gt_loss",
    "l2l_loss",
    "logit_kd_loss",
    "next_token_targets",
    "token_scale",
    "topk_with_sampled_tail",
    "tsld_loss",
]
