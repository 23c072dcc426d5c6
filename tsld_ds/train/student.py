"""The student as the DeepSpeed engine trains it: decoder body, lm_head and the loss in one forward.

The fused loss reads `lm_head.weight` directly instead of calling the lm_head module, so the weight
is registered as an external parameter of this wrapper: ZeRO-3 gathers it for this forward (and
its backward) and its gradient reaches the right shards.
"""
import deepspeed
from torch import nn

from tsld_ds.losses import distillation_loss, fused_linear_cross_entropy
from tsld_ds.models import model_body


def summed_nll(hidden, weight, bias, labels, chunks: dict | None = None):
    """(summed next-token NLL, number of predicted tokens) for perplexity. `chunks`: the fused
    loss's chunk_size / vocab_chunk_size."""
    n_tokens = (labels[:, 1:] != -100).sum()
    mean = fused_linear_cross_entropy(hidden, weight, labels, lm_head_bias=bias, **(chunks or {}))
    return mean * n_tokens, n_tokens


class DistillationStudent(nn.Module):
    def __init__(self, model, *, kd: str, temperature: float, loss_impl: str,
                 chunks: dict | None = None, token_scale: str = "confidence"):
        super().__init__()
        self.model = model
        self.kd = kd
        self.temperature = temperature
        self.token_scale = token_scale
        self.loss_impl = loss_impl
        self.chunks = chunks or {}  # the fused loss's chunk_size / vocab_chunk_size
        head = model.get_output_embeddings()
        for p in (head.weight, getattr(head, "bias", None)):
            if p is not None and hasattr(p, "ds_id"):
                deepspeed.zero.register_external_parameter(self, p)

    @property
    def wants_teacher_layers(self) -> bool:
        return self.kd == "l2l"

    def forward(self, input_ids, labels, teacher=None, *, nll_only: bool = False):
        """Training: the dict of loss terms of `kd`. With `nll_only`: (summed NLL, token count)."""
        layers = self.wants_teacher_layers and not nll_only
        out = model_body(self.model)(input_ids=input_ids, output_hidden_states=layers,
                                     output_attentions=layers, use_cache=False)
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        if nll_only:
            return summed_nll(out.last_hidden_state, head.weight, bias, labels, self.chunks)
        teacher_args = {}
        if teacher is not None:
            teacher_args = dict(teacher_logits=teacher.logits, teacher_hidden=teacher.hidden,
                                teacher_weight=teacher.weight, teacher_bias=teacher.bias,
                                teacher_hidden_states=teacher.hidden_states,
                                teacher_attentions=teacher.attentions)
        return distillation_loss(
            self.kd, student_hidden=out.last_hidden_state, lm_head_weight=head.weight,
            lm_head_bias=bias, labels=labels, temperature=self.temperature,
            token_scale=self.token_scale, impl=self.loss_impl,
            student_hidden_states=out.hidden_states if layers else None,
            student_attentions=out.attentions if layers else None, **self.chunks, **teacher_args)
