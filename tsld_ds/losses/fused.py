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
teacher-only pass first (a top-k cache brings it instead).

A teacher from a top-k cache (`TopKTeacher`) takes no logits blocks: its soft CE over K + 1
buckets needs the student's logits at the K ids and the student's mass outside them, and its
gradient is the student's block scaled per row plus K scattered entries per row.

`fused_linear_loss` is the one functional entry point; `tsld_ds.losses.modules` wraps it as
`nn.Module`s.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import positions
from .positions import next_token_targets
from .teacher import TeacherOutput

if TYPE_CHECKING:  # the objective calls this module
    from .objective import Objective


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


def fused_linear_loss(student_hidden: Tensor, lm_head_weight: Tensor, labels: Tensor,
                      objective: "Objective", teacher: Optional["TeacherOutput"] = None, *,
                      lm_head_bias: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """The logit terms of `objective` (its soft term and ground-truth CE; docs/method.md §2) as
    {"loss": differentiable total, term: detached value, ...}, equal to the reference losses on
    `student_hidden @ lm_head_weight.T (+ lm_head_bias)`. Its layer term and its `impl` are the
    caller's (`Objective.__call__` adds the one and chooses this function by the other).

    student_hidden [B, L, H] (unshifted), labels [B, L]; the teacher as in `TeacherOutput`.
    Gradients reach student_hidden, lm_head_weight and lm_head_bias.
    """
    batch, length, hidden_size = student_hidden.shape
    vocab_size = lm_head_weight.shape[0]
    acc_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    targets = next_token_targets(labels, objective.ignore_index)
    valid = targets != objective.ignore_index
    rows = valid.flatten().nonzero().squeeze(1)
    row_targets = targets.flatten()[rows]
    chunk_size = objective.chunk_size or default_chunk_size(vocab_size, hidden_size)
    vocab_chunk_size = objective.vocab_chunk_size or vocab_size
    if objective.soft is not None:
        if teacher is None:
            raise ValueError(f"the {objective.soft} term needs the teacher's output")
        if teacher.vocab_size not in (None, vocab_size):
            raise ValueError(f"teacher vocabulary {teacher.vocab_size} != student vocabulary "
                             f"{vocab_size}")
        teacher = teacher.token_rows()

    per_token_mean = torch.full_like(row_targets, 1, dtype=acc_dtype) / max(rows.numel(), 1)
    soft_coef = per_token_mean if objective.soft == "logit" else None
    if objective.soft == "tsld":
        teacher_ce = torch.zeros(batch * length, dtype=acc_dtype, device=rows.device)
        if teacher.topk is not None:  # the cache's label log-probabilities, exact
            teacher_ce[rows] = -teacher.topk.target_logprob[rows].to(acc_dtype)
        else:
            teacher_ce[rows] = _teacher_target_ce(teacher, rows, row_targets, chunk_size,
                                                  vocab_chunk_size, acc_dtype)
        weights = positions.token_scale(teacher_ce.view(batch, length), valid,
                                        objective.temperature, objective.token_scale)
        if objective.reduction == "mean":
            weights = weights / valid.any(dim=-1).sum().clamp_min(1)
        soft_coef = weights.flatten()[rows]
    spec = _RowLoss(rows, row_targets, soft_coef, per_token_mean if objective.hard else None,
                    teacher, chunk_size, vocab_chunk_size)

    hidden = student_hidden.reshape(batch * length, hidden_size)
    trainable = [t for t in (student_hidden, lm_head_weight, lm_head_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in trainable):
        loss, soft_total, hard_total = _FusedLinearLoss.apply(hidden, lm_head_weight,
                                                              lm_head_bias, spec)
    else:  # evaluation: values only, one matmul per chunk
        soft_total, hard_total = _ChunkedLinearLoss(hidden, lm_head_weight, lm_head_bias, spec,
                                                    needs_grad=(False, False, False)).run()
        loss = soft_total + hard_total
    terms = {"loss": loss}
    if objective.hard:
        terms["gt"] = hard_total.detach()
    if objective.soft is not None:
        terms[objective.soft] = soft_total.detach()
    return terms


@dataclass(frozen=True, eq=False)
class _RowLoss:
    """What the chunk engine sums: Σ_n soft_coef[n]·softCE_n + hard_coef[n]·CE_n over the token
    rows `rows` of the flattened hidden states, scored on `targets`. A missing coefficient drops
    its term; the teacher (flattened, see `TeacherOutput.token_rows`) gives p^T."""

    rows: Tensor                      # [n]
    targets: Tensor                   # [n]
    soft_coef: Optional[Tensor]       # [n]
    hard_coef: Optional[Tensor]       # [n]
    teacher: Optional["TeacherOutput"]
    chunk_size: int
    vocab_chunk_size: int


class _FusedLinearLoss(torch.autograd.Function):
    """Runs the chunk engine in forward and keeps its gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec: _RowLoss):
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
    """The chunk engine: a `_RowLoss` of hidden [N, H] through the lm_head (weight [V, H], bias)
    and, when asked, its gradients, one chunk of token rows at a time.

    Per chunk, `_statistics` is the first sweep over the vocabulary blocks (each row's
    log-sum-exp, the teacher's normalizer and Σ p^T z, the target logit) and `_push_gradients`
    turns them into the logits' gradient, block by block (`_block_gradient`), into grad_hidden,
    grad_W and grad_b: with one block from the first sweep's buffers (`_one_block_gradient`),
    else by a second sweep (`_gradient_sweep`). Statistics and accumulators are float32 (float64
    for float64 inputs); matmuls run in the input dtype.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], spec: _RowLoss,
                 needs_grad: Tuple[bool, bool, bool]):
        self.hidden, self.weight, self.bias, self.spec = hidden, weight, bias, spec
        self.acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        need_hidden, need_weight, need_bias = needs_grad
        self.needs_grad = any(needs_grad)
        self.grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        self.grad_weight = weight.new_zeros(weight.shape, dtype=self.acc_dtype) \
            if need_weight else None
        self.grad_bias = bias.new_zeros(bias.shape, dtype=self.acc_dtype) if need_bias else None
        self.vocab_blocks = list(_chunks(weight.shape[0], spec.vocab_chunk_size))
        self.one_block = len(self.vocab_blocks) == 1
        # Two reused blocks: the student's logits, then exp(z - max) and the logits' gradient;
        # the teacher's logits, then exp(z^T - max) (with top-k rows and a tail bucket: the
        # student's logits off the K ids, then their exp in their own frame; sparse top-k rows
        # need none).
        block = min(spec.chunk_size, spec.rows.numel()) * min(spec.vocab_chunk_size,
                                                              weight.shape[0])
        self.student_buffer = hidden.new_empty(block, dtype=self.acc_dtype)
        topk = spec.teacher.topk if spec.soft_coef is not None else None
        sparse = topk is not None and not _has_tail_bucket(topk, weight.shape[0])
        self.teacher_buffer = hidden.new_empty(block, dtype=self.acc_dtype) \
            if spec.soft_coef is not None and not sparse else None

    def run(self) -> Tuple[Tensor, Tensor]:
        """(soft total, hard total); the gradients are then in `grads()`."""
        soft_total = self.hidden.new_zeros((), dtype=self.acc_dtype)
        hard_total = self.hidden.new_zeros((), dtype=self.acc_dtype)
        spec = self.spec
        for chunk in _chunks(spec.rows.numel(), spec.chunk_size):
            rows = _ChunkRows(spec, chunk, self.hidden, self.weight.shape[0])
            stats = self._statistics(rows)
            log_sum = stats.student.log_sum_exp()
            if rows.topk is not None:  # lse(z') - Σ_S q z'_S [- P^T_tail log Σ_{not S} e^z']
                soft_ce = log_sum - torch.einsum("nk,nk->n", rows.topk_p, stats.topk_logit)
                if rows.tail_bucket:
                    soft_ce -= _times_finite(rows.teacher_tail, stats.tail.log_sum_exp())
                soft_total += rows.soft_coef @ soft_ce
            elif rows.soft_coef is not None:  # -Σ p^T log p^S = lse(z') - Σ p^T z'
                soft_total += rows.soft_coef @ (log_sum - stats.teacher_dot / stats.teacher.sum)
            if rows.hard_coef is not None:
                hard_total += rows.hard_coef @ (log_sum - stats.target_logit)
            if self.needs_grad:
                self._push_gradients(rows, stats)
        return soft_total, hard_total

    def grads(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; None where not asked."""
        return (
            self.grad_hidden,
            None if self.grad_weight is None else self.grad_weight.to(self.weight.dtype),
            None if self.grad_bias is None else self.grad_bias.to(self.bias.dtype),
        )

    def _student_logits(self, rows: "_ChunkRows", cols: slice) -> Tensor:
        return _linear_into(_block(self.student_buffer, rows.n, cols), rows.hidden,
                            self.weight[cols], None if self.bias is None else self.bias[cols])

    def _teacher_logits(self, rows: "_ChunkRows", cols: slice) -> Tensor:
        return _teacher_logits_into(_block(self.teacher_buffer, rows.n, cols), self.spec.teacher,
                                    rows.index, cols)

    def _statistics(self, rows: "_ChunkRows") -> "_RowStatistics":
        """First sweep. Student logits are shifted by their first block's row max, so that
        Σ p^T z and z[y] are taken on moderate numbers: log p^S = z' - lse(z')."""
        n, device = rows.n, self.hidden.device
        stats = _RowStatistics(student=_RunningLogSumExp(n, self.acc_dtype, device),
                               target_logit=torch.zeros(n, dtype=self.acc_dtype, device=device))
        if rows.topk is not None:
            stats.topk_logit = torch.zeros_like(rows.topk_p)
            if rows.tail_bucket:
                stats.tail = _RunningLogSumExp(n, self.acc_dtype, device)
        elif rows.soft_coef is not None:
            stats.teacher = _RunningLogSumExp(n, self.acc_dtype, device)
            stats.teacher_dot = torch.zeros(n, dtype=self.acc_dtype, device=device)
        for cols in self.vocab_blocks:
            logits = self._student_logits(rows, cols)
            if cols.start == 0:
                stats.shift = logits.amax(dim=1)
            logits -= stats.shift[:, None]
            if rows.hard_coef is not None:
                inside, col = _targets_in(cols, rows.targets)
                stats.target_logit = torch.where(
                    inside, logits.gather(1, col[:, None]).squeeze(1), stats.target_logit)
            if rows.topk is not None:
                inside, col = _targets_in(cols, rows.topk_ids)
                stats.topk_logit = torch.where(inside, logits.gather(1, col), stats.topk_logit)
                if rows.tail_bucket:
                    # The student's logits off the K ids get a log-sum-exp of their own:
                    # summed directly (1 - Σ_S p^S cancels) and in their own frame (relative
                    # to the overall max they can underflow).
                    tail = _block(self.teacher_buffer, rows.n, cols).copy_(logits)
                    stats.tail.add_exp_(_mask_entries_(tail, inside, col))
                    stats.tail_exp = tail
            elif rows.soft_coef is not None:
                teacher_exp = self._teacher_logits(rows, cols)
                rescale = stats.teacher.add_exp_(teacher_exp)
                stats.teacher_dot = (stats.teacher_dot * rescale
                                     + torch.einsum("nv,nv->n", teacher_exp, logits))
                stats.teacher_exp = teacher_exp
            if cols.start == 0:
                stats.student.start_shifted_(logits)
            else:
                stats.student.add_exp_(logits)
            stats.student_exp = logits
        return stats

    def _push_gradients(self, rows: "_ChunkRows", stats: "_RowStatistics") -> None:
        """d/dz [a·softCE + b·CE] = (a + b)·p^S - a·p^T - b·onehot(y) for every vocabulary
        block, pushed through the lm_head: from the first sweep's buffers when there is one
        block, else by a second sweep."""
        soft_c = rows.soft_coef if rows.soft_coef is not None else 0
        hard_c = rows.hard_coef if rows.hard_coef is not None else 0
        student_factor = (soft_c + hard_c) / stats.student.sum
        teacher_factor = topk_grad = None
        if rows.topk is not None and not rows.tail_bucket:  # p^S - q, q sparse on the ids
            topk_grad = -soft_c[:, None] * rows.topk_p
        elif rows.topk is not None:
            # p^S - q, q = p^T on the K ids and the teacher's tail mass spread over the
            # student's tail in its proportions. Off the K ids, with T = lse of the student's
            # tail: (a+b)·p^S_j - a·P^T_tail·e^(z'_j - T) = e^(z'_j - T)·[(a+b)·e^(T - lse) -
            # a·P^T_tail], the block taken in the tail's frame (both factors at most 1).
            # On them: (a+b)·p^S - a·p^T, scattered apart.
            log_sum, tail_lse = stats.student.log_sum_exp(), stats.tail.log_sum_exp()
            ab = soft_c + hard_c
            topk_grad = (ab[:, None] * (stats.topk_logit - log_sum[:, None]).exp()
                         - soft_c[:, None] * rows.topk_p)
            student_factor = (ab * (tail_lse - log_sum).exp()
                              - soft_c * rows.teacher_tail) / stats.tail.sum
        elif rows.soft_coef is not None:
            teacher_factor = (soft_c / stats.teacher.sum)[:, None]
        factors = (student_factor[:, None], teacher_factor, hard_c, topk_grad)
        if self.one_block:
            grad_h = self._one_block_gradient(rows, stats, factors)
        else:
            grad_h = self._gradient_sweep(rows, stats, factors)
        if self.grad_hidden is not None:
            self.grad_hidden.index_copy_(0, rows.index, grad_h.to(self.grad_hidden.dtype))

    def _one_block_gradient(self, rows: "_ChunkRows", stats: "_RowStatistics",
                            factors: tuple) -> Optional[Tensor]:
        """One block: the first sweep left exp(z' - max) and exp(z^T - max) in the buffers, so
        no logits are recomputed."""
        block = stats.tail_exp if rows.tail_bucket else stats.student_exp
        return self._block_gradient(rows, self.vocab_blocks[0], block, stats.teacher_exp,
                                    factors)

    def _gradient_sweep(self, rows: "_ChunkRows", stats: "_RowStatistics",
                        factors: tuple) -> Optional[Tensor]:
        """The second sweep: each block's logits recomputed and exponentiated with the first
        sweep's statistics; the blocks' grad_hidden add up in float32."""
        grad_h = None if self.grad_hidden is None else \
            self.hidden.new_zeros((rows.n, self.hidden.shape[1]), dtype=self.acc_dtype)
        for cols in self.vocab_blocks:
            student_exp = self._student_logits(rows, cols)
            if not rows.tail_bucket:
                student_exp.sub_((stats.shift + stats.student.max)[:, None]).exp_()
            else:  # in the tail's frame, the K ids' entries 0
                student_exp.sub_(stats.shift[:, None])
                _mask_entries_(student_exp, *_targets_in(cols, rows.topk_ids))
                student_exp.sub_(stats.tail.max[:, None]).exp_()
            teacher_exp = None
            if rows.soft_coef is not None and rows.topk is None:
                teacher_exp = self._teacher_logits(rows, cols)
                teacher_exp.sub_(stats.teacher.max[:, None]).exp_()
            block_grad_h = self._block_gradient(rows, cols, student_exp, teacher_exp, factors)
            if grad_h is not None:
                grad_h.add_(block_grad_h)
        return grad_h

    def _block_gradient(self, rows: "_ChunkRows", cols: slice, student_exp: Tensor,
                        teacher_exp: Optional[Tensor], factors: tuple) -> Optional[Tensor]:
        """One block's gradient w.r.t. the logits, built in place in `student_exp`, added into
        grad_W and grad_b; returns the block's part of grad_hidden (None when not asked)."""
        student_factor, teacher_factor, hard_c, topk_grad = factors
        grad_logits = student_exp.mul_(student_factor)
        if teacher_factor is not None:
            grad_logits.addcmul_(teacher_exp, teacher_factor, value=-1)
        if topk_grad is not None:  # the ids' part (their whole gradient when there is a bucket)
            inside, col = _targets_in(cols, rows.topk_ids)
            grad_logits.scatter_add_(1, col, torch.where(inside, topk_grad, 0))
        if rows.hard_coef is not None:
            inside, col = _targets_in(cols, rows.targets)
            grad_logits.scatter_add_(1, col[:, None], (-hard_c * inside)[:, None])
        if self.grad_weight is not None:  # float32 GEMM into the accumulator: exact for bf16
            self.grad_weight[cols].addmm_(grad_logits.t(), rows.hidden.to(self.acc_dtype))
        if self.grad_bias is not None:
            self.grad_bias[cols] += grad_logits.sum(dim=0)
        if self.grad_hidden is None:
            return None
        return grad_logits.to(self.weight.dtype) @ self.weight[cols]


class _ChunkRows:
    """One chunk of a `_RowLoss`: its token rows, their hidden states, targets and coefficients."""

    def __init__(self, spec: _RowLoss, chunk: slice, hidden: Tensor, vocab_size: int):
        self.index, self.targets = spec.rows[chunk], spec.targets[chunk]
        self.n = len(self.index)
        self.hidden = hidden.index_select(0, self.index)
        self.soft_coef = None if spec.soft_coef is None else spec.soft_coef[chunk]
        self.hard_coef = None if spec.hard_coef is None else spec.hard_coef[chunk]
        # A top-k teacher's rows: q on the ids, the ids, and, when the rest of the teacher's
        # mass is one bucket (not a sampled tail, and not every token listed), that mass.
        self.topk = None if spec.soft_coef is None else spec.teacher.topk
        self.tail_bucket = False
        if self.topk is not None:
            dtype = spec.soft_coef.dtype
            self.topk_p = self.topk.logprobs.index_select(0, self.index).to(dtype).exp()
            self.topk_ids = self.topk.ids.index_select(0, self.index).long()
            self.tail_bucket = _has_tail_bucket(self.topk, vocab_size)
            if self.tail_bucket:
                self.teacher_tail = (1 - self.topk_p.sum(dim=1)).clamp_min(0)
            elif not self.topk.has_tail:  # a sampled tail: the entries hold all the mass
                self.topk_p /= self.topk_p.sum(dim=1, keepdim=True)


@dataclass
class _RowStatistics:
    """A chunk's first-sweep results, per row."""

    student: "_RunningLogSumExp"            # of the shifted student logits z' = z - shift
    target_logit: Tensor                    # z'[y]
    shift: Optional[Tensor] = None          # the first block's row max
    teacher: Optional["_RunningLogSumExp"] = None
    teacher_dot: Optional[Tensor] = None    # Σ exp(z^T - max) z'
    student_exp: Optional[Tensor] = None    # the last block, as exp(z' - max) when one block
    teacher_exp: Optional[Tensor] = None    # the last block, as exp(z^T - max)
    topk_logit: Optional[Tensor] = None     # z' at a top-k teacher's K ids
    tail: Optional["_RunningLogSumExp"] = None  # of z' off them
    tail_exp: Optional[Tensor] = None       # the last block, as exp(z' - tail max), 0 on them


class _RunningLogSumExp:
    """Per-row log Σ exp over vocabulary blocks seen one at a time: a running max and the sum of
    exp(z - running max), rescaled whenever the max grows."""

    def __init__(self, rows: int, dtype, device):
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)

    def add_exp_(self, block: Tensor) -> Tensor:
        """Folds in a [rows, width] block, which it overwrites with exp(block - new max).
        Returns the factor exp(old max - new max) by which sums over earlier blocks shrink."""
        new_max = torch.maximum(self.max, block.amax(dim=1))
        rescale = (self.max - new_max).exp()
        block.sub_(new_max[:, None]).exp_()
        self.sum = self.sum * rescale + block.sum(dim=1)
        self.max = new_max
        return rescale

    def start_shifted_(self, block: Tensor) -> None:
        """Starts from a first block already shifted to row max 0, overwritten with its exp
        (saves add_exp_'s max and subtraction passes)."""
        self.max = torch.zeros_like(self.max)
        self.sum = block.exp_().sum(dim=1)

    def log_sum_exp(self) -> Tensor:
        return self.max + self.sum.log()


@torch.no_grad()
def _teacher_target_ce(teacher: "TeacherOutput", rows: Tensor, targets: Tensor, chunk_size: int,
                       vocab_chunk_size: int, dtype) -> Tensor:
    """CE^T = logsumexp(z^T) - z^T[y] for each selected row, chunk by chunk (TSLD's token
    scale needs all of them before any weighted term)."""
    ce = torch.empty(rows.numel(), dtype=dtype, device=rows.device)
    block = min(chunk_size, rows.numel()) * min(vocab_chunk_size, teacher.vocab_size)
    buffer = torch.empty(block, dtype=dtype, device=rows.device)
    for chunk in _chunks(rows.numel(), chunk_size):
        idx, y = rows[chunk], targets[chunk]
        target_logit = torch.zeros(len(idx), dtype=dtype, device=rows.device)
        lse = _RunningLogSumExp(len(idx), dtype, rows.device)
        for cols in _chunks(teacher.vocab_size, vocab_chunk_size):
            logits = _teacher_logits_into(_block(buffer, len(idx), cols), teacher, idx, cols)
            inside, col = _targets_in(cols, y)
            target_logit = torch.where(inside, logits.gather(1, col[:, None]).squeeze(1),
                                       target_logit)
            lse.add_exp_(logits)
        ce[chunk] = lse.log_sum_exp() - target_logit
    return ce


def _teacher_logits_into(out: Tensor, teacher: "TeacherOutput", rows: Tensor,
                         cols: slice) -> Tensor:
    """out = the teacher's logits of token rows `rows`, vocabulary entries `cols`, from its
    flattened logits or from its hidden states and lm_head."""
    if teacher.logits is None:
        return _linear_into(out, teacher.hidden.index_select(0, rows), teacher.weight[cols],
                            None if teacher.bias is None else teacher.bias[cols])
    return _copy_rows_into(out, teacher.logits[:, cols], rows)


def _has_tail_bucket(topk, vocab_size: int) -> bool:
    """Whether a top-k teacher leaves the rest of its mass as one bucket: not when its entries
    carry it all (a sampled tail, or every token listed)."""
    return topk.has_tail and topk.ids.shape[-1] < vocab_size


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


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """out = x @ weight.T (+ bias): the matmul runs in x's dtype, the result lands in out's dtype.

    Writing into a reused buffer matters on CPU, where a fresh [chunk, V] allocation costs more
    (page faults) than the matmul's own output writes.
    """
    if x.dtype != out.dtype:
        return out.copy_(F.linear(x, weight, bias))
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


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


def _chunks(length: int, chunk_size: int):
    """Slices of [0, length) of chunk_size entries (the last one shorter): token rows or
    vocabulary entries."""
    return (slice(start, min(start + chunk_size, length))
            for start in range(0, length, chunk_size))


def _block(buffer: Tensor, rows: int, cols: slice) -> Tensor:
    """A contiguous [rows, block width] view at the start of a flat reused buffer."""
    width = cols.stop - cols.start
    return buffer[: rows * width].view(rows, width)


def _targets_in(cols: slice, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(whether each row's target lies in the vocabulary block, its column in the block or 0)."""
    inside = (targets >= cols.start) & (targets < cols.stop)
    return inside, torch.where(inside, targets - cols.start, 0)
