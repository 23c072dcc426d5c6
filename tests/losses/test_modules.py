"""The fused losses as nn.Modules for other trainers: each equals its reference on full logits
(values and gradients, float64), and the example of the README trains a Hugging Face
student against a teacher in a plain PyTorch loop."""
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    make_loss_inputs,
    student_inputs,
    teacher_logits_of,
    teacher_of,
    tiny_llama_config,
)

from tsld_ds.losses import (
    FusedLinearCrossEntropyLoss,
    FusedLinearLogitKDLoss,
    FusedLinearTSLDLoss,
    gt_loss,
    logit_kd_loss,
    tsld_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(name, logits, teacher_logits, labels):
    return {
        "ce": lambda: gt_loss(logits, labels),
        "logit": lambda: logit_kd_loss(logits, teacher_logits, labels),
        "logit+gt": lambda: logit_kd_loss(logits, teacher_logits, labels) + gt_loss(logits, labels),
        "tsld": lambda: tsld_loss(logits, teacher_logits, labels),
        "tsld+gt": lambda: tsld_loss(logits, teacher_logits, labels) + gt_loss(logits, labels),
        "tsld_mean_inverse": lambda: tsld_loss(logits, teacher_logits, labels, reduction="mean",
                                               token_scale="inverse", temperature=2.0),
    }[name]()


MODULES = {
    "ce": lambda: FusedLinearCrossEntropyLoss(chunk_size=4),
    "logit": lambda: FusedLinearLogitKDLoss(chunk_size=4),
    "logit+gt": lambda: FusedLinearLogitKDLoss(with_gt=True, vocab_chunk_size=10),
    "tsld": lambda: FusedLinearTSLDLoss(),
    "tsld+gt": lambda: FusedLinearTSLDLoss(with_gt=True, chunk_size=5, vocab_chunk_size=7),
    "tsld_mean_inverse": lambda: FusedLinearTSLDLoss(reduction="mean", token_scale="inverse",
                                                     temperature=2.0),
}


@pytest.mark.parametrize("name", MODULES)
def test_each_module_equals_its_reference(name, device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device, dtype=torch.float64, bias=True,
                              teacher_form="hidden")
    hidden, weight, labels = student_inputs(inputs)
    bias = inputs["lm_head_bias"]
    loss = MODULES[name]()(hidden, weight, labels, teacher_of(inputs), lm_head_bias=bias)
    expected = reference(name, F.linear(hidden, weight, bias), teacher_logits_of(inputs), labels)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-14)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight, bias)),
                         torch.autograd.grad(expected, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def documented_example() -> str:
    """The code block of the README's "The fused losses in your own loop"."""
    section = (REPO / "README.md").read_text().split("## The fused losses in your own loop")[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_example_trains_a_student_in_a_plain_loop(builtin_tokenizer):
    """The README's code, as written there, run as the step of a plain loop: its loss
    equals the reference on full logits, and five AdamW steps lower it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(len(builtin_tokenizer))
    student, teacher = (AutoModelForCausalLM.from_config(config) for _ in range(2))
    teacher.requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (2, 16), device="cpu")
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that is not scored
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    step = compile(documented_example(), "README.md", "exec")
    losses = []
    for _ in range(5):
        scope = {"torch": torch, "student": student, "teacher": teacher, "ids": ids,
                 "labels": labels}
        exec(step, scope)  # defines loss and runs its backward
        with torch.no_grad():
            expected = reference("tsld+gt", student.lm_head(scope["student_hidden"]),
                                 teacher.lm_head(scope["teacher_hidden"]), labels)
        torch.testing.assert_close(scope["loss"].detach(), expected, rtol=1e-5, atol=1e-6)
        assert all(p.grad is not None for p in student.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(scope["loss"].item())
    assert losses[-1] < losses[0]


def test_another_ignore_index_skips_its_positions(device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device, dtype=torch.float64, bias=False,
                              teacher_form="logits")
    hidden, weight, labels = student_inputs(inputs)
    relabelled = labels.masked_fill(labels == -100, -1)
    loss_fn = FusedLinearTSLDLoss(with_gt=True, ignore_index=-1)
    loss = loss_fn(hidden, weight, relabelled, teacher_of(inputs))
    logits, teacher_logits = F.linear(hidden, weight), teacher_logits_of(inputs)
    expected = (tsld_loss(logits, teacher_logits, relabelled, ignore_index=-1)
                + gt_loss(logits, relabelled, ignore_index=-1))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss, FusedLinearTSLDLoss(with_gt=True)(
        hidden, weight, labels, teacher_of(inputs)), rtol=1e-12, atol=0)
