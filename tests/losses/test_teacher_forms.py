"""The teacher forms of the fused loss: which form a teacher comes in, each form's CE on the label
(TSLD's token scale) against the reference, and the chunk engine's contract with a form: a form
added as a class (a uniform teacher, here) gives the reference loss and gradients."""
import pytest
import torch
import torch.nn.functional as F
from helpers import make_loss_inputs, teacher_logits_of, teacher_of

from tsld_ds.losses import TeacherOutput, TopKTeacher, gt_loss, logit_kd_loss, next_token_targets
from tsld_ds.losses.fused import RowLoss, fused_row_loss
from tsld_ds.losses.teacher_forms import (
    FullForm,
    SparseTopKForm,
    TeacherForm,
    TopKBucketForm,
    form_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 13


def topk_rows(k, has_tail=True):
    """A TeacherOutput of top-k cache rows [2, 3, k] (their values do not matter here)."""
    return TeacherOutput(topk=TopKTeacher(torch.zeros(2, 3, k), torch.zeros(2, 3, k,
                                                                           dtype=torch.int32),
                                          torch.zeros(2, 3), has_tail))


@pytest.mark.parametrize("teacher,form", [
    (lambda: TeacherOutput(logits=torch.zeros(2, 3, VOCAB)), FullForm),
    (lambda: TeacherOutput(hidden=torch.zeros(2, 3, 4), weight=torch.zeros(VOCAB, 4)), FullForm),
    (lambda: topk_rows(5), TopKBucketForm),
    (lambda: topk_rows(5, has_tail=False), SparseTopKForm),  # top k and a sampled tail
    (lambda: topk_rows(VOCAB), SparseTopKForm),  # every token listed: no mass left for a bucket
], ids=["logits", "hidden", "topk-bucket", "topk-sampled-tail", "topk-every-token"])
def test_form_of_names_the_form_a_teacher_comes_in(teacher, form):
    assert form_of(teacher().token_rows(), VOCAB) is form


def valid_rows(labels):
    targets = next_token_targets(labels).flatten()
    rows = (targets != -100).nonzero().squeeze(1)
    return rows, targets[rows]


@pytest.mark.parametrize("chunk,vocab_chunk", [(8, 37), (5, 7), (1, 1), (64, 64)])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_full_form_target_ce_is_the_teachers_ce_on_the_label(teacher_form, chunk, vocab_chunk,
                                                             device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device, dtype=torch.float64, bias=True,
                              teacher_form=teacher_form)
    rows, targets = valid_rows(inputs["labels"])
    ce = FullForm.target_ce(teacher_of(inputs).token_rows(), rows, targets, chunk, vocab_chunk,
                            torch.float64)
    logp = torch.log_softmax(teacher_logits_of(inputs).double(), dim=-1).flatten(0, 1)
    torch.testing.assert_close(ce, -logp[rows, targets], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", [TopKBucketForm, SparseTopKForm])
def test_topk_forms_target_ce_is_the_cached_label_logprob(form, device):
    target_logprob = -torch.linspace(0.1, 3.0, 10, device=device).view(2, 5)
    teacher = TeacherOutput(topk=TopKTeacher(torch.zeros(2, 5, 3, device=device),
                                             torch.zeros(2, 5, 3, dtype=torch.int32,
                                                         device=device), target_logprob))
    rows = torch.tensor([0, 3, 4, 8], device=device)
    ce = form.target_ce(teacher.token_rows(), rows, rows, 2, 3, torch.float64)
    assert torch.equal(ce, -target_logprob.flatten()[rows].double())


class UniformForm(TeacherForm):
    """A teacher that spreads its mass evenly over the V tokens, given as its (equal) logits but
    read without them: softCE = lse(z') - mean z', and the gradient's -a·p^T is -a/V everywhere.
    The student's block and its factor are the base's."""

    def __init__(self, teacher, index, buffer, dtype, device):
        super().__init__(teacher, index, buffer, dtype, device)
        self.vocab = teacher.vocab_size
        self.logit_sum = torch.zeros(self.n, dtype=dtype, device=device)
        self.part = None

    def add_block_(self, logits, cols):
        self.logit_sum += logits.sum(dim=1)

    def soft_ce(self, log_sum):
        return log_sum - self.logit_sum / self.vocab

    def gradient_factor(self, soft_coef, hard_coef, student):
        self.part = (soft_coef / self.vocab)[:, None]
        return super().gradient_factor(soft_coef, hard_coef, student)

    def add_gradient_(self, grad, cols):
        grad.sub_(self.part)


@pytest.mark.parametrize("chunk,vocab_chunk", [(8, 37), (5, 7), (1, 1)])
def test_a_form_added_as_a_class_gives_the_reference_loss(chunk, vocab_chunk, device):
    """The engine reads a teacher only through its form: a uniform teacher's form, with no
    change to the engine, gives logit KD + CE against all-equal teacher logits, one sweep and
    vocabulary blocks, values and gradients (float64)."""
    inputs = make_loss_inputs(3, 7, 37, 11, device=device, dtype=torch.float64, bias=True,
                              teacher_form="logits")
    hidden, weight, bias, labels = (inputs[k] for k in ("student_hidden", "lm_head_weight",
                                                        "lm_head_bias", "labels"))
    uniform_logits = torch.zeros_like(inputs["teacher_logits"])
    rows, targets = valid_rows(labels)
    per_token_mean = torch.full(rows.shape, 1 / rows.numel(), dtype=torch.float64, device=device)
    spec = RowLoss(rows, targets, per_token_mean, per_token_mean, UniformForm,
                   TeacherOutput(logits=uniform_logits).token_rows(), chunk, vocab_chunk)
    loss, soft, hard = fused_row_loss(hidden.flatten(0, 1), weight, bias, spec)

    logits = F.linear(hidden, weight, bias)
    expected_soft = logit_kd_loss(logits, uniform_logits, labels)
    expected_hard = gt_loss(logits, labels)
    torch.testing.assert_close(soft, expected_soft.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hard, expected_hard.detach(), rtol=1e-12, atol=1e-14)
    params = (hidden, weight, bias)
    for got, want in zip(torch.autograd.grad(loss, params),
                         torch.autograd.grad(expected_soft + expected_hard, params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
