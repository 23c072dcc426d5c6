"""The teacher's forms in the fused loss (docs/method.md §2.5, §3.2): for one chunk of token rows,
a form gives the chunk engine (`fused.py`) what its soft target p^T contributes:

- its statistics, folded in block by block during the engine's first sweep over the vocabulary,
  from the student's logits shifted to z' (`add_block_`);
- its soft cross-entropy -Σ p^T log p^S = lse(z') - Σ p^T z' (`soft_ce`);
- its gradient factors, in d/dz [a·softCE + b·CE] = (a + b)·p^S - a·p^T - b·onehot(y): the
  factor of the student's block and the frame that block is exponentiated in
  (`gradient_factor`, `first_sweep_block`, `sweep_block_`), and the -a·p^T part
  (`add_gradient_`);
- the teacher's CE on the label, which TSLD's token scale needs for every row first
  (`target_ce`).

`TeacherForm` itself has no soft target (an objective with the ground-truth CE alone). A
subclass per form of the teacher: `FullForm` (logits, given or built block by block from its
hidden states and lm_head), `TopKBucketForm` (a top-k cache's K entries and one bucket for the
rest of the mass: `tsld-cache --tail_samples 0`) and `SparseTopKForm` (K entries that carry the
whole mass: the top k and a sampled tail, `topk_with_sampled_tail`, or every token). `form_of`
says which form a teacher comes in; adding a form is adding a class and its line there.
"""

import torch
from torch import Tensor

from .blocks import RunningLogSumExp, block_view, chunks, linear_into, targets_in
from .teacher import TeacherOutput


class TeacherForm:
    """The teacher's side of one chunk of token rows `index` (rows of the flattened batch), its
    statistics in `dtype` on `device`; `buffer` is a flat reused one of [chunk, vocabulary block]
    entries where the class `uses_buffer`.

    This base has no soft target: the student's block enters the gradient as the first sweep
    leaves it, exp(z' - max), times (a + b) / Σ exp(z' - max)."""

    uses_buffer = False

    def __init__(self, teacher: TeacherOutput | None, index: Tensor, buffer: Tensor | None,
                 dtype, device):
        self.index, self.n, self.buffer = index, len(index), buffer

    @classmethod
    def target_ce(cls, teacher: TeacherOutput, rows: Tensor, targets: Tensor, chunk_size: int,
                  vocab_chunk_size: int, dtype) -> Tensor:
        """CE^T = -log p^T[y] of the token rows `rows` on their `targets`, in `dtype`."""
        raise NotImplementedError(f"{cls.__name__} has no soft target")

    def add_block_(self, logits: Tensor, cols: slice) -> None:
        """First sweep: folds in the student's shifted logits z' of vocabulary block `cols`
        (the engine exponentiates them in place next)."""

    def soft_ce(self, log_sum: Tensor) -> Tensor:
        """-Σ p^T log p^S per row, after the first sweep; `log_sum` = lse(z')."""
        raise NotImplementedError(f"{type(self).__name__} has no soft target")

    def gradient_factor(self, soft_coef, hard_coef, student: RunningLogSumExp) -> Tensor:
        """The per-row factor of the student's block in the logits' gradient (the soft and hard
        coefficients a and b; `student` the first sweep's log-sum-exp of z'). A form sets its own
        factors for `add_gradient_` here."""
        return (soft_coef + hard_coef) / student.sum

    def first_sweep_block(self, student_exp: Tensor) -> Tensor:
        """With one vocabulary block: the student's block for the gradient, from the first
        sweep's buffers (`student_exp` = exp(z' - max)), so that no logits are recomputed."""
        return student_exp

    def sweep_block_(self, logits: Tensor, cols: slice, shift: Tensor,
                     student: RunningLogSumExp) -> Tensor:
        """Second sweep: the student's recomputed logits z of block `cols` turned in place into
        its block for the gradient (z' = z - shift)."""
        return logits.sub_((shift + student.max)[:, None]).exp_()

    def add_gradient_(self, grad: Tensor, cols: slice) -> None:
        """Adds the teacher's part, -a·p^T, to block `cols` of the logits' gradient."""


class FullForm(TeacherForm):
    """The teacher's logits: given [N, V], or built block by block from its hidden states and
    lm_head into the buffer. Statistics: its online log-sum-exp and Σ exp(z^T - max)·z', rescaled
    alike, so that Σ p^T z' = that sum / Σ exp(z^T - max). Gradient: -a·p^T, the teacher's
    block as exp(z^T - max) (the first sweep's with one block, else recomputed) times
    a / Σ exp(z^T - max)."""

    uses_buffer = True

    def __init__(self, teacher, index, buffer, dtype, device):
        super().__init__(teacher, index, buffer, dtype, device)
        self.teacher = teacher
        self.lse = RunningLogSumExp(self.n, dtype, device)
        self.dot = torch.zeros(self.n, dtype=dtype, device=device)  # Σ exp(z^T - max) z'
        self.block = None  # the last block, as exp(z^T - max)
        self.factor = None

    @classmethod
    @torch.no_grad()
    def target_ce(cls, teacher, rows, targets, chunk_size, vocab_chunk_size, dtype):
        """CE^T = logsumexp(z^T) - z^T[y], chunk by chunk over the rows and block by block over
        the vocabulary, as the loss itself goes."""
        ce = torch.empty(rows.numel(), dtype=dtype, device=rows.device)
        block = min(chunk_size, rows.numel()) * min(vocab_chunk_size, teacher.vocab_size)
        buffer = torch.empty(block, dtype=dtype, device=rows.device)
        for chunk in chunks(rows.numel(), chunk_size):
            idx, y = rows[chunk], targets[chunk]
            target_logit = torch.zeros(len(idx), dtype=dtype, device=rows.device)
            lse = RunningLogSumExp(len(idx), dtype, rows.device)
            for cols in chunks(teacher.vocab_size, vocab_chunk_size):
                logits = _logits_into(block_view(buffer, len(idx), cols), teacher, idx, cols)
                inside, col = targets_in(cols, y)
                target_logit = torch.where(inside, logits.gather(1, col[:, None]).squeeze(1),
                                           target_logit)
                lse.add_exp_(logits)
            ce[chunk] = lse.log_sum_exp() - target_logit
        return ce

    def add_block_(self, logits, cols):
        teacher_exp = self._logits(cols)
        rescale = self.lse.add_exp_(teacher_exp)
        self.dot = self.dot * rescale + torch.einsum("nv,nv->n", teacher_exp, logits)
        self.block = teacher_exp

    def soft_ce(self, log_sum):
        return log_sum - self.dot / self.lse.sum

    def gradient_factor(self, soft_coef, hard_coef, student):
        self.factor = (soft_coef / self.lse.sum)[:, None]
        return super().gradient_factor(soft_coef, hard_coef, student)

    def sweep_block_(self, logits, cols, shift, student):
        student_exp = super().sweep_block_(logits, cols, shift, student)
        self.block = self._logits(cols).sub_(self.lse.max[:, None]).exp_()
        return student_exp

    def add_gradient_(self, grad, cols):
        grad.addcmul_(self.block, self.factor, value=-1)

    def _logits(self, cols: slice) -> Tensor:
        return _logits_into(block_view(self.buffer, self.n, cols), self.teacher, self.index, cols)


class SparseTopKForm(TeacherForm):
    """A top-k cache's rows whose entries carry the teacher's whole mass: the top k and a sampled
    tail (`topk_with_sampled_tail`; q normalized to sum to 1 exactly, against the cache's float32
    round-off), or every token. softCE = lse(z') - Σ_i q_i z'[id_i] needs the student's logits
    at the ids only; the gradient's -a·q is K entries per row, scattered. TSLD's CE^T is the
    cache's label log-probability, exact."""

    def __init__(self, teacher, index, buffer, dtype, device):
        super().__init__(teacher, index, buffer, dtype, device)
        topk = teacher.topk
        self.p = topk.logprobs.index_select(0, index).to(dtype).exp()
        self.ids = topk.ids.index_select(0, index).long()
        if not topk.has_tail:  # a sampled tail: the entries hold all the mass
            self.p /= self.p.sum(dim=1, keepdim=True)
        self.logit = torch.zeros_like(self.p)  # z' at the ids
        self.ids_grad = None

    @classmethod
    def target_ce(cls, teacher, rows, targets, chunk_size, vocab_chunk_size, dtype):
        return -teacher.topk.target_logprob[rows].to(dtype)

    def add_block_(self, logits, cols):
        inside, col = targets_in(cols, self.ids)
        self.logit = torch.where(inside, logits.gather(1, col), self.logit)

    def soft_ce(self, log_sum):
        return log_sum - torch.einsum("nk,nk->n", self.p, self.logit)

    def gradient_factor(self, soft_coef, hard_coef, student):
        self.ids_grad = -soft_coef[:, None] * self.p
        return super().gradient_factor(soft_coef, hard_coef, student)

    def add_gradient_(self, grad, cols):
        """The ids' part (their whole gradient, with a tail bucket)."""
        inside, col = targets_in(cols, self.ids)
        grad.scatter_add_(1, col, torch.where(inside, self.ids_grad, 0))


def topk_with_sampled_tail(logprobs: Tensor, k: int, samples: int, generator):
    """The top k of log-probabilities [n, V] and their ids, followed by `samples` tokens drawn
    with replacement from the distribution outside them: each distinct token drawn c times gets
    log(c / samples · P_tail), so the sparse target's expectation is the full distribution (its
    entries sum to 1); slots a repeated draw leaves hold other tail tokens at -inf. [n, k +
    samples] values and ids, the ids of a row distinct. `tsld-cache --tail_samples` stores these
    rows; `SparseTopKForm` reads them."""
    values, ids = logprobs.topk(k, dim=-1)
    if samples == 0:
        return values, ids
    tail = logprobs.scatter(1, ids, float("-inf"))
    tail_mass = tail.logsumexp(dim=1, keepdim=True)
    # A row whose tail is all -inf draws uniformly; its draws weigh log 0 = -inf.
    proposal = torch.where(tail_mass.isfinite(), torch.softmax(tail, dim=1), 1.0)
    drawn = torch.multinomial(proposal, samples, replacement=True, generator=generator)
    counts = torch.zeros_like(logprobs).scatter_add_(1, drawn, torch.ones_like(logprobs[:, :1])
                                                     .expand_as(drawn))
    counts.scatter_(1, ids, -1.0)  # a slot left by a repeated draw never takes a top-k id
    count, tail_ids = counts.topk(samples, dim=-1)
    tail_values = torch.where(count > 0, (count / samples).log() + tail_mass, float("-inf"))
    return torch.cat([values, tail_values], dim=1), torch.cat([ids, tail_ids], dim=1)


class TopKBucketForm(SparseTopKForm):
    """A top-k cache's K entries and one bucket for the rest of the teacher's mass, P^T_tail =
    1 - Σ_S p^T (`TopKTeacher`: the soft CE over K + 1 buckets). The student's bucket, the
    log-sum-exp of its logits off the K ids, is worked out in the buffer in a frame of its own:
    summed directly (1 - Σ_S p^S cancels) and relative to its own max (relative to the overall
    max it can underflow)."""

    uses_buffer = True

    def __init__(self, teacher, index, buffer, dtype, device):
        super().__init__(teacher, index, buffer, dtype, device)
        self.tail_mass = (1 - self.p.sum(dim=1)).clamp_min(0)
        self.tail = RunningLogSumExp(self.n, dtype, device)  # of z' off the ids
        self.tail_exp = None  # the last block, as exp(z' - tail max), 0 on the ids

    def add_block_(self, logits, cols):
        super().add_block_(logits, cols)
        tail = block_view(self.buffer, self.n, cols).copy_(logits)
        self.tail.add_exp_(_mask_entries_(tail, *targets_in(cols, self.ids)))
        self.tail_exp = tail

    def soft_ce(self, log_sum):  # ... - P^T_tail log Σ_{not S} e^z'
        soft_ce = super().soft_ce(log_sum)
        soft_ce -= _times_finite(self.tail_mass, self.tail.log_sum_exp())
        return soft_ce

    def gradient_factor(self, soft_coef, hard_coef, student):
        # p^S - q, q = p^T on the K ids and the teacher's tail mass spread over the student's
        # tail in its proportions. Off the K ids, with T = lse of the student's tail:
        # (a+b)·p^S_j - a·P^T_tail·e^(z'_j - T) = e^(z'_j - T)·[(a+b)·e^(T - lse) - a·P^T_tail],
        # the block taken in the tail's frame (both factors at most 1). On them:
        # (a+b)·p^S - a·p^T, scattered apart.
        log_sum, tail_lse = student.log_sum_exp(), self.tail.log_sum_exp()
        ab = soft_coef + hard_coef
        self.ids_grad = (ab[:, None] * (self.logit - log_sum[:, None]).exp()
                         - soft_coef[:, None] * self.p)
        return (ab * (tail_lse - log_sum).exp() - soft_coef * self.tail_mass) / self.tail.sum

    def first_sweep_block(self, student_exp):
        return self.tail_exp

    def sweep_block_(self, logits, cols, shift, student):
        """In the tail's frame, the K ids' entries 0."""
        logits.sub_(shift[:, None])
        _mask_entries_(logits, *targets_in(cols, self.ids))
        return logits.sub_(self.tail.max[:, None]).exp_()


def form_of(teacher: TeacherOutput, vocab_size: int) -> type[TeacherForm]:
    """The form `teacher` comes in, for a student of `vocab_size` tokens."""
    if teacher.topk is None:
        return FullForm
    # A tail bucket unless the entries carry the whole mass: a sampled tail, or every token.
    if teacher.topk.has_tail and teacher.topk.ids.shape[-1] < vocab_size:
        return TopKBucketForm
    return SparseTopKForm


def _logits_into(out: Tensor, teacher: TeacherOutput, rows: Tensor, cols: slice) -> Tensor:
    """out = the teacher's logits of token rows `rows`, vocabulary entries `cols`, from its
    flattened logits or from its hidden states and lm_head."""
    if teacher.logits is None:
        return linear_into(out, teacher.hidden.index_select(0, rows), teacher.weight[cols],
                           None if teacher.bias is None else teacher.bias[cols])
    return _copy_rows_into(out, teacher.logits[:, cols], rows)


def _copy_rows_into(out: Tensor, source: Tensor, rows: Tensor) -> Tensor:
    """out[i] = source[rows[i]], cast to out's dtype.

    The rows come in runs of consecutive positions (a sequence's valid ones). On the CPU a slice
    copy per run is about 3x faster than index_select, which matters for [chunk, V] teacher
    logits; on a GPU index_select is as fast and avoids reading the rows back to the host.
    """
    if source.device.type != "cpu":
        if source.dtype == out.dtype:
            return torch.index_select(source, 0, rows, out=out)
        return out.copy_(source.index_select(0, rows))
    positions = rows.tolist()
    run_start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            first = positions[run_start]
            out[run_start:i].copy_(source[first:first + i - run_start])
            run_start = i
    return out


def _mask_entries_(block: Tensor, inside: Tensor, col: Tensor) -> Tensor:
    """Pushes logits block[n, col[n, k]] where inside[n, k] down by a quarter of the dtype's
    largest value, so that their exp is 0 and they never hold a row's max while another entry
    is left: added, so the others (their col a placeholder 0) add 0 whatever the order."""
    lowered = inside.to(block.dtype) * (-torch.finfo(block.dtype).max / 4)
    return block.scatter_add_(1, col, lowered)


def _times_finite(weight: Tensor, value: Tensor) -> Tensor:
    """weight · value, 0 where the weight is 0 (even where the value is ±inf): a teacher tail of
    no mass adds nothing, however small the student's tail."""
    return torch.where(weight > 0, weight * value, 0)
