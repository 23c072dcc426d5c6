"""The student's loss step (tsld_ds/train/student.py): with --gradient_checkpointing every decoder
block recomputes its activations in backward, and the loss and gradients stay those without it."""
import copy

import pytest
import torch
from helpers import tiny_llama_config

from tsld_ds.losses import Objective, TeacherOutput
from tsld_ds.models import model_body
from tsld_ds.quant import QuantConfig, quantize_model
from tsld_ds.train.build import enable_gradient_checkpointing
from tsld_ds.train.student import DistillationStudent


def teacher_output(teacher, input_ids) -> TeacherOutput:
    with torch.no_grad():
        out = model_body(teacher)(input_ids=input_ids, output_hidden_states=True,
                                  output_attentions=True, use_cache=False)
    return TeacherOutput(hidden=out.last_hidden_state, weight=teacher.lm_head.weight,
                         hidden_states=out.hidden_states, attentions=out.attentions)


def loss_and_grads(student, input_ids, labels, teacher):
    """(loss, gradients by name, bytes the forward saved for backward)."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = student(input_ids, labels, teacher)
    losses["loss"].backward()
    return losses["loss"].detach(), {n: p.grad.clone() for n, p in student.named_parameters()
                                     if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("kd, on_host", [
    ("gt", False), ("logit", False), ("logit_gt", False), ("tsld", False), ("l2l", False),
    pytest.param("tsld", True, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the block inputs move to the host from a GPU")),
])
def test_gradient_checkpointing_keeps_loss_and_gradients(kd, on_host):
    """A ternary student, one micro-batch, each --kd (and the block inputs kept on the host, as
    DeepSpeed's cpu_checkpointing asks): the loss and every gradient with every block recomputed
    in backward equal those with stored activations to fp32 round-off; and the forward kept less
    than half the bytes for backward."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(64, num_hidden_layers=3, attn_implementation="eager")
    teacher = LlamaForCausalLM(config).eval().requires_grad_(False)
    plain = copy.deepcopy(teacher).requires_grad_(True).train()
    with torch.no_grad():  # a student apart from its teacher
        for p in plain.parameters():
            p.add_(0.02 * torch.randn_like(p))
    quantize_model(plain, QuantConfig(bits=2))
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed, on_host=on_host)
    input_ids = torch.randint(0, 64, (2, 24))
    labels = input_ids.clone()
    labels[0, :5] = -100
    if on_host:
        device = torch.device("cuda")
        teacher, plain, checkpointed = (m.to(device) for m in (teacher, plain, checkpointed))
        input_ids, labels = input_ids.to(device), labels.to(device)
    target = teacher_output(teacher, input_ids)
    results = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        student = DistillationStudent(model, Objective.from_kd(kd))
        results[name] = loss_and_grads(student, input_ids, labels, target)
    (loss, grads, saved), (ck_loss, ck_grads, ck_saved) = results["plain"], \
        results["checkpointed"]
    assert ck_saved < saved / 2
    torch.testing.assert_close(ck_loss, loss, rtol=1e-6, atol=0)
    assert ck_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, rtol=1e-5,
                                   atol=1e-6 * grad.abs().max().item(), msg=name)


def test_gradient_checkpointing_of_a_model_without_it_is_refused(no_checkpointing_dir,
                                                                  tiny_llama_dir):
    """Refused from the config alone, before any model loads, naming the fix."""
    from tsld_ds.errors import UsageError
    from tsld_ds.models import check_gradient_checkpointing

    with pytest.raises(UsageError, match="does not support gradient checkpointing; drop "
                                         "--gradient_checkpointing"):
        check_gradient_checkpointing(str(no_checkpointing_dir), "--model")
    check_gradient_checkpointing(str(tiny_llama_dir), "--model")  # LLaMA can
