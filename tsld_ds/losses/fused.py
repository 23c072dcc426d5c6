"""The fused lm_head loss (docs/method.md §3): CE, logit KD and TSLD from the final hidden states
and the lm_head, never building the [tokens, vocab] logits.

The student's logits z = h @ W.T (+ b) exist one block at a time, [chunk tokens, vocab_chunk
entries], in a reused float32 buffer. For every chunk the loss value *and* its gradient are
computed in forward: for a per-token loss a_n·softCE_n + b_n·CE_n the gradient w.r.t. the logits
is (a_n + b_n)·p^S - a_n·p^T - b_n·onehot(y_n), pushed straight through the lm_head into
grad_hidden [N, H] and the float32 accumulators grad_W [V, H], grad_b [V]; backward only scales
them by grad_output. Peak extra memory is two blocks (student, teacher) plus those gradients.

By default a block spans the whole vocabulary, so one sweep gives both the exact normalizer and
the gradient: 3 matmuls per chunk (logits, grad_hidden, grad_W), as autograd through the naive
loss. With `vocab_chunk_size` < V (vocabularies too large for even a small token chunk) a first
sweep keeps a running max and rescaled sum per row (online log-sum-exp) for student and teacher,
and a second sweep recomputes each block's logits to push its gradient: 4 matmuls. The TSLD
token scale needs every position's teacher CE before any weighted term, so TSLD runs a
teacher-only pass first (`TeacherForm.target_ce`; a top-k cache brings it instead).

This module is the chunk engine: the chunking over tokens and vocabulary, the student's online
log-sum-exp and target logit, and the gradient's accumulation into grad_hidden, grad_W and
grad_b. What the teacher adds (its statistics, its soft CE, its part of the gradient) is its
form's, `tsld_ds.losses.teacher_forms`: full logits or hidden states and lm_head, top k with a
tail bucket, top k with a sampled tail. A teacher from a top-k cache takes no logits blocks: its
soft CE needs the student's logits at the K ids (and, with the bucket, the student's mass outside
them), and its gradient is the student's block scaled per row plus K scattered entries per row.

`fused_row_loss` runs the engine on a `RowLoss`, the per-row coefficients of the soft and hard
terms. `tsld_ds.losses.objective.fused_linear_loss`, the one functional entry point, sets them
from an `Objective`; `tsld_ds.losses.modules` wraps that as `nn.Module`s.
"""
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blocks import RunningLogSumExp, block_view, chunks, linear_into, targets_in
from .teacher import TeacherOutput
from .teacher_forms import TeacherForm


def default_chunk_size(vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk when none is given: min(max(H // 4, 2^22 // V), 2^27 // V), floored to a
    multiple of 16 and at least 16.

    A chunk works in two float32 [chunk, V] buffers. chunk <= H/4 keeps them within half the size
    of the float32 [V, H] weight-gradient accumulator that the loss holds anyway, so that the
    loss adds at most 1.5x that accumulator; a buffer of up to 16 MiB (2^22 // V) is always
    allowed, so that a small model's batch takes few, large matmuls; and 2^27 // V caps one
    buffer at 512 MiB.
    """
    chunk = min(max(hidden_size // 4, (1 << 22) // vocab_size), (1 << 27) // vocab_size)
    return max(16, chunk // 16 * 16)


@dataclass(frozen=True, eq=False)
class RowLoss:
    """What the chunk engine sums: Σ_n soft_coef[n]·softCE_n + hard_coef[n]·CE_n over the token
    rows `rows` of the flattened hidden states, scored on `targets`. A missing coefficient drops
    its term; the teacher (flattened, see `TeacherOutput.token_rows`) gives p^T in its `form`
    (`TeacherForm` itself without a soft term)."""

    rows: Tensor                      # [n]
    targets: Tensor                   # [n]
    soft_coef: Tensor | None       # [n]
    hard_coef: Tensor | None       # [n]
    form: type[TeacherForm]
    teacher: TeacherOutput | None
    chunk_size: int
    vocab_chunk_size: int


def fused_row_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                   spec: RowLoss) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, soft total, hard total) of `spec` on hidden [N, H] through the lm_head (weight
    [V, H], bias): the loss differentiable w.r.t. those of them that require grad, the totals
    not. Without autograd (evaluation) only the values, one matmul per chunk."""
    trainable = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in trainable):
        return _FusedLinearLoss.apply(hidden, weight, bias, spec)
    soft_total, hard_total = _ChunkedLinearLoss(hidden, weight, bias, spec,
                                                needs_grad=(False, False, False)).run()
    return soft_total + hard_total, soft_total, hard_total


class _FusedLinearLoss(torch.autograd.Function):
    """Runs the chunk engine in forward and keeps its gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec: RowLoss):
        engine = _ChunkedLinearLoss(hidden, weight, bias, spec,
                                    needs_grad=tuple(ctx.needs_input_grad[:3]))
        soft_total, hard_total = engine.run()
        ctx.grads = engine.grads()
        ctx.mark_non_differentiable(soft_total, hard_total)
        return soft_total + hard_total, soft_total, hard_total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_soft, _grad_hard):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss can be backpropagated once: it hands over its gradients"
            )
        grads, ctx.grads = ctx.grads, None
        # In place: the gradients are ours and backward runs once.
        return tuple(None if g is None else g.mul_(grad_loss) for g in grads) + (None,)


class _ChunkedLinearLoss:
    """The chunk engine: a `RowLoss` of hidden [N, H] through the lm_head (weight [V, H], bias)
    and, when asked, its gradients, one chunk of token rows at a time.

    Per chunk, `_statistics` is the first sweep over the vocabulary blocks (each row's
    log-sum-exp and target logit, and the teacher form's statistics) and `_push_gradients` turns
    them into the logits' gradient, block by block (`_block_gradient`), into grad_hidden, grad_W
    and grad_b: with one block from the first sweep's buffers, else by a second sweep
    (`_gradient_sweep`). The teacher's side of each step is its form's. Statistics and
    accumulators are float32 (float64 for float64 inputs); matmuls run in the input dtype.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, spec: RowLoss,
                 needs_grad: tuple[bool, bool, bool]):
        self.hidden, self.weight, self.bias, self.spec = hidden, weight, bias, spec
        self.acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        need_hidden, need_weight, need_bias = needs_grad
        self.needs_grad = any(needs_grad)
        self.grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        self.grad_weight = weight.new_zeros(weight.shape, dtype=self.acc_dtype) \
            if need_weight else None
        self.grad_bias = bias.new_zeros(bias.shape, dtype=self.acc_dtype) if need_bias else None
        self.vocab_blocks = list(chunks(weight.shape[0], spec.vocab_chunk_size))
        self.one_block = len(self.vocab_blocks) == 1
        # Two reused blocks: the student's logits, then exp(z - max) and the logits' gradient;
        # the teacher form's, where it takes one (full logits, then exp(z^T - max); top-k rows
        # with a tail bucket: the student's logits off the K ids, then their exp in their own
        # frame; sparse top-k rows take none).
        block = min(spec.chunk_size, spec.rows.numel()) * min(spec.vocab_chunk_size,
                                                              weight.shape[0])
        self.student_buffer = hidden.new_empty(block, dtype=self.acc_dtype)
        self.teacher_buffer = hidden.new_empty(block, dtype=self.acc_dtype) \
            if spec.form.uses_buffer else None

    def run(self) -> tuple[Tensor, Tensor]:
        """(soft total, hard total); the gradients are then in `grads()`."""
        soft_total = self.hidden.new_zeros((), dtype=self.acc_dtype)
        hard_total = self.hidden.new_zeros((), dtype=self.acc_dtype)
        spec = self.spec
        for chunk in chunks(spec.rows.numel(), spec.chunk_size):
            rows = _ChunkRows(spec, chunk, self.hidden)
            teacher = spec.form(spec.teacher, rows.index, self.teacher_buffer, self.acc_dtype,
                                self.hidden.device)
            stats = self._statistics(rows, teacher)
            log_sum = stats.student.log_sum_exp()
            if rows.soft_coef is not None:
                soft_total += rows.soft_coef @ teacher.soft_ce(log_sum)
            if rows.hard_coef is not None:
                hard_total += rows.hard_coef @ (log_sum - stats.target_logit)
            if self.needs_grad:
                self._push_gradients(rows, stats, teacher)
        return soft_total, hard_total

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; None where not asked."""
        return (
            self.grad_hidden,
            None if self.grad_weight is None else self.grad_weight.to(self.weight.dtype),
            None if self.grad_bias is None else self.grad_bias.to(self.bias.dtype),
        )

    def _student_logits(self, rows: "_ChunkRows", cols: slice) -> Tensor:
        return linear_into(block_view(self.student_buffer, rows.n, cols), rows.hidden,
                           self.weight[cols], None if self.bias is None else self.bias[cols])

    def _statistics(self, rows: "_ChunkRows", teacher: TeacherForm) -> "_StudentStatistics":
        """First sweep. Student logits are shifted by their first block's row max, so that
        Σ p^T z and z[y] are taken on moderate numbers: log p^S = z' - lse(z')."""
        stats = _StudentStatistics(
            student=RunningLogSumExp(rows.n, self.acc_dtype, self.hidden.device),
            target_logit=torch.zeros(rows.n, dtype=self.acc_dtype, device=self.hidden.device))
        for cols in self.vocab_blocks:
            logits = self._student_logits(rows, cols)
            if cols.start == 0:
                stats.shift = logits.amax(dim=1)
            logits -= stats.shift[:, None]
            if rows.hard_coef is not None:
                inside, col = targets_in(cols, rows.targets)
                stats.target_logit = torch.where(
                    inside, logits.gather(1, col[:, None]).squeeze(1), stats.target_logit)
            teacher.add_block_(logits, cols)
            if cols.start == 0:
                stats.student.start_shifted_(logits)
            else:
                stats.student.add_exp_(logits)
            stats.student_exp = logits
        return stats

    def _push_gradients(self, rows: "_ChunkRows", stats: "_StudentStatistics",
                        teacher: TeacherForm) -> None:
        """d/dz [a·softCE + b·CE] = (a + b)·p^S - a·p^T - b·onehot(y) for every vocabulary
        block, pushed through the lm_head: from the first sweep's buffers when there is one
        block, else by a second sweep."""
        soft_c = rows.soft_coef if rows.soft_coef is not None else 0
        hard_c = rows.hard_coef if rows.hard_coef is not None else 0
        student_factor = teacher.gradient_factor(soft_c, hard_c, stats.student)[:, None]
        if self.one_block:
            grad_h = self._block_gradient(rows, self.vocab_blocks[0],
                                          teacher.first_sweep_block(stats.student_exp),
                                          student_factor, teacher)
        else:
            grad_h = self._gradient_sweep(rows, stats, student_factor, teacher)
        if self.grad_hidden is not None:
            self.grad_hidden.index_copy_(0, rows.index, grad_h.to(self.grad_hidden.dtype))

    def _gradient_sweep(self, rows: "_ChunkRows", stats: "_StudentStatistics",
                        student_factor: Tensor, teacher: TeacherForm) -> Tensor | None:
        """The second sweep: each block's logits recomputed and exponentiated with the first
        sweep's statistics; the blocks' grad_hidden add up in float32."""
        grad_h = None if self.grad_hidden is None else \
            self.hidden.new_zeros((rows.n, self.hidden.shape[1]), dtype=self.acc_dtype)
        for cols in self.vocab_blocks:
            student_exp = teacher.sweep_block_(self._student_logits(rows, cols), cols,
                                               stats.shift, stats.student)
            block_grad_h = self._block_gradient(rows, cols, student_exp, student_factor, teacher)
            if grad_h is not None:
                grad_h.add_(block_grad_h)
        return grad_h

    def _block_gradient(self, rows: "_ChunkRows", cols: slice, student_exp: Tensor,
                        student_factor: Tensor, teacher: TeacherForm) -> Tensor | None:
        """One block's gradient w.r.t. the logits, built in place in `student_exp`, added into
        grad_W and grad_b; returns the block's part of grad_hidden (None when not asked)."""
        grad_logits = student_exp.mul_(student_factor)
        teacher.add_gradient_(grad_logits, cols)
        if rows.hard_coef is not None:
            inside, col = targets_in(cols, rows.targets)
            grad_logits.scatter_add_(1, col[:, None], (-rows.hard_coef * inside)[:, None])
        if self.grad_weight is not None:  # float32 GEMM into the accumulator: exact for bf16
            self.grad_weight[cols].addmm_(grad_logits.t(), rows.hidden.to(self.acc_dtype))
        if self.grad_bias is not None:
            self.grad_bias[cols] += grad_logits.sum(dim=0)
        if self.grad_hidden is None:
            return None
        return grad_logits.to(self.weight.dtype) @ self.weight[cols]


class _ChunkRows:
    """One chunk of a `RowLoss`: its token rows, their hidden states, targets and coefficients."""

    def __init__(self, spec: RowLoss, chunk: slice, hidden: Tensor):
        self.index, self.targets = spec.rows[chunk], spec.targets[chunk]
        self.n = len(self.index)
        self.hidden = hidden.index_select(0, self.index)
        self.soft_coef = None if spec.soft_coef is None else spec.soft_coef[chunk]
        self.hard_coef = None if spec.hard_coef is None else spec.hard_coef[chunk]


@dataclass
class _StudentStatistics:
    """A chunk's first-sweep results for the student, per row (the teacher's are its form's)."""

    student: RunningLogSumExp           # of the shifted student logits z' = z - shift
    target_logit: Tensor                # z'[y]
    shift: Tensor | None = None      # the first block's row max
    student_exp: Tensor | None = None  # the last block, as exp(z' - max)
