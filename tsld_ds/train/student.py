"""The student as the DeepSpeed engine trains it: decoder body, lm_head and the loss in one forward
(the loss step), so that ZeRO-3 gathers every weight the loss reads.

The fused loss reads `lm_head.weight` directly instead of calling the lm_head module, so the weight
is registered as an external parameter of this wrapper: ZeRO-3 gathers it for this forward (and
its backward) and its gradient reaches the right shards.
"""
import deepspeed
from torch import nn

from tsld_ds.evaluation.perplexity import summed_nll
from tsld_ds.losses import Objective, TeacherOutput
from tsld_ds.models import model_body


class DistillationStudent(nn.Module):
    def __init__(self, model, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective
        head = model.get_output_embeddings()
        for p in (head.weight, getattr(head, "bias", None)):
            if p is not None and hasattr(p, "ds_id"):
                deepspeed.zero.register_external_parameter(self, p)

    def forward(self, input_ids, labels, teacher: TeacherOutput | None = None, *,
                nll_only: bool = False):
        """Training: the objective's dict of loss terms. With `nll_only`: (summed NLL, token
        count) for perplexity."""
        layers = self.objective.layers and not nll_only
        out = model_body(self.model)(input_ids=input_ids, output_hidden_states=layers,
                                     output_attentions=layers, use_cache=False)
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        if nll_only:
            return summed_nll(out.last_hidden_state, head.weight, bias, labels,
                              chunk_size=self.objective.chunk_size,
                              vocab_chunk_size=self.objective.vocab_chunk_size)
        return self.objective(out.last_hidden_state, head.weight, labels, teacher,
                              lm_head_bias=bias, student_hidden_states=out.hidden_states,
                              student_attentions=out.attentions)
