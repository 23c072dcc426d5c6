"""The frozen teacher in its own DeepSpeed inference engine (no optimizer, no gradients).

Its parameters are replicated on every rank (ZeRO stage 0) when they fit beside the student
(`tsld_ds.capacity.placement` decides), else partitioned across ranks by ZeRO-3 like the
student's; it produces its outputs on the fly for each micro-batch. For the fused loss it returns final
hidden states and lends its lm_head (gathered) instead of [tokens, vocab] logits.
"""
import contextlib
import copy

import deepspeed
import torch
from torch import nn

from tsld_ds.losses import TeacherOutput
from tsld_ds.models import model_body

# Keys of a student DeepSpeed config that also describe how the teacher must run.
_SHARED_KEYS = ("train_micro_batch_size_per_gpu", "bf16", "fp16", "steps_per_print",
                "wall_clock_breakdown")


# What the derived ZeRO-3 config leaves to the teacher's shape (resolve_zero_sizes fills them):
# without a bound on what is gathered at once, DeepSpeed's prefetch gathers a 7B block's weights
# all ahead of their use.
_TEACHER_AUTO_SIZES = {key: "auto" for key in ("stage3_prefetch_bucket_size",
                                                "stage3_param_persistence_threshold",
                                                "stage3_max_live_parameters")}


def teacher_ds_config(student_config: dict, teacher_config: dict | None = None) -> dict:
    """The teacher's engine config: the given one, or ZeRO-3 inference derived from the student's.

    Precision and logging follow the student's where the given config does not set them; the
    micro-batch always does (both engines see the same batches). The derived ZeRO-3 config also
    takes the student's offload_param and memory_efficient_linear: DeepSpeed's memory-efficient
    linear replaces torch's F.linear for the whole process, the student's layers included. Its
    gather sizes are "auto", for the caller to fill from the teacher's shape
    (`tsld_ds.train.build.resolve_zero_sizes`)."""
    config = {k: copy.deepcopy(v) for k, v in student_config.items() if k in _SHARED_KEYS}
    if teacher_config is not None and ("bf16" in teacher_config or "fp16" in teacher_config):
        config.pop("bf16", None)   # a config that sets its precision sets all of it
        config.pop("fp16", None)
    if teacher_config is None:
        teacher_config = {"zero_optimization": {"stage": 3, **_TEACHER_AUTO_SIZES}}
        student_zero = student_config.get("zero_optimization", {})
        for key in ("offload_param", "memory_efficient_linear"):
            if key in student_zero:
                teacher_config["zero_optimization"][key] = copy.deepcopy(student_zero[key])
    config.update(copy.deepcopy(teacher_config))
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_accumulation_steps"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = student_config["train_micro_batch_size_per_gpu"]
    config["gradient_accumulation_steps"] = 1
    return config


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
