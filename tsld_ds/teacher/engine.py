"""The frozen teacher in its own DeepSpeed inference engine (no optimizer, no gradients).

Its parameters are replicated on every rank (ZeRO stage 0) when they fit beside the student
(`tsld_ds.capacity.placement` decides), else partitioned across ranks by ZeRO-3 like the student's
(`tsld_ds.run.ds_config.teacher_ds_config` derives that config); it produces its outputs on the fly
for each micro-batch. For the fused loss it returns final hidden states and lends its lm_head
(gathered) instead of [tokens, vocab] logits.
"""
import contextlib

import deepspeed
import torch
from torch import nn

from tsld_ds.losses import TeacherOutput
from tsld_ds.models import model_body


class _TeacherForward(nn.Module):
    """What the engine runs: the body, and the lm_head only when logits are asked for. Returns
    (hidden states or logits, every block's hidden states, attention maps)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *, want_logits: bool, want_layers: bool):
        out = model_body(self.model)(input_ids=input_ids, output_hidden_states=want_layers,
                                     output_attentions=want_layers, use_cache=False)
        final = out.last_hidden_state
        if want_logits:
            final = self.model.get_output_embeddings()(final)
        return final, out.hidden_states, out.attentions


class TeacherEngine:
    def __init__(self, model, ds_config: dict):
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.engine, *_ = deepspeed.initialize(model=_TeacherForward(model), config=ds_config)
        self.engine.eval()

    def partitioning(self) -> tuple[int, int]:
        """(elements of the teacher in the whole model, elements held by this rank)."""
        params = list(self.model.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return full, local

    @contextlib.contextmanager
    def outputs(self, input_ids, *, rows=None, want_logits: bool = False,
                want_layers: bool = False):
        """Runs the teacher on a micro-batch and yields its `TeacherOutput`: logits, or (the
        fused path) its final hidden states with its lm_head, whose weight and bias stay gathered
        until the block ends, for the loss to read. (`rows`, the batch's row indices, are what a
        `TeacherCache` reads by; the engine computes from input_ids.)"""
        with torch.no_grad():
            final, hidden_states, attentions = self.engine(input_ids, want_logits=want_logits,
                                                           want_layers=want_layers)
        layers = dict(hidden_states=hidden_states, attentions=attentions) if want_layers else {}
        if want_logits:
            yield TeacherOutput(logits=final, **layers)
            return
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        params = [p for p in (head.weight, bias) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield TeacherOutput(hidden=final, weight=head.weight, bias=bias, **layers)
