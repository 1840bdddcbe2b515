"""Cross-entropy fused with the output layer, computed a chunk of rows at a time.

`F.cross_entropy(hidden @ weight.T, targets)` materialises the logits of every
position (2,048 x 10,000 floats, 82 MB, for a batch of 32 x 64 on PTB), then
walks them several more times: log-softmax, its backward, a zero-filled
gradient. On a CPU those passes over memory cost as much as the matmuls.
Here each chunk of rows gets its logits, exponentiated in place, and right
away its gradient (softmax minus one-hot) while the chunk is still in cache.
Where a bound on the logits (|h . w| <= ||h|| max ||w||) shows that exp
cannot overflow, the usual shift by each row's max is skipped: one exp pass
and one sum. The normalisers and the mean's row weights (1 / count, 0 on
ignored rows) scale the small (rows, C) operands of the gradient matmuls, not
the (rows, vocab) gradient. Both gradients are finished in the forward pass,
and backward hands them on, scaled only when the loss was. Same loss and
gradients up to float rounding (tests/test_loss.py), about 1.4x the training
throughput of the `small` model on 2 CPU cores (benchmarks/train_speed.py).

In bf16 (under bf16 autocast, or with bf16 weights) the three matmuls run in
bf16, where a CPU with AMX runs them at 3.6x the fp32 rate (README, "On an AMX
Xeon", 2026-12-03: the loss 4.07x the plain bf16 one, benchmarks/loss_speed.py --bf16),
while the exponentials, their sums, the loss and the gradients' accumulation
across chunks stay in float32, and each gradient comes back in its input's
dtype (float32 master weights get float32 gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmlab.onednn import mm, uses_onednn
from lmlab.tied_gradient import TiedGradient

# Rows per chunk: 512 x 10,000 fp32 logits is 20 MB, which stays in a server CPU's
# last-level cache. Measured on 2 cores for the `small` model's step: 256 rows is 2%
# slower (the matmuls pack the whole weight once per chunk), 1,024 rows 4% slower and
# one chunk of 2,048 rows 8%.
CHUNK_ROWS = 512
# ... but at most this many bytes of logits per chunk. At a 250,000-word vocabulary
# (WikiText-103's is 267,735) 512 rows of fp32 logits are a 488 MiB buffer, a third of
# a `small` training process; 64 rows are 61 MiB, and on 2 cores a loss step at 64 rows
# measured within the noise of one at 512 (32 rows: 1.7x slower). PTB's 10,000 words and
# a 32,000-token BPE keep 512 rows.
CHUNK_BYTES = 64 * 2**20
# Rows of the output layer's gradient whose bf16 product is made at once before it is added
# in float32 (`_accumulate`): 16 MiB at n_embd 256.
ACCUMULATE_ROWS = 32_768
IGNORE_INDEX = -100  # the target of a position that is not scored (padding), as in F.cross_entropy


def rows_per_chunk(vocab_size: int, dtype: torch.dtype) -> int:
    """CHUNK_ROWS, or fewer where that many rows of `dtype` logits would exceed CHUNK_BYTES
    (a multiple of 16, at least 16)."""
    fit = CHUNK_BYTES // max(1, vocab_size * dtype.itemsize)
    return max(16, min(CHUNK_ROWS, fit // 16 * 16))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ignore_index: int,
        chunk_rows: int,
        mean: bool,
        compute_dtype: torch.dtype,
        tied: TiedGradient | None,
    ) -> Tensor:
        # The casts below are the whole of mixed precision here: autocast would recast
        # every mm and cannot write into the preallocated buffers.
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grads = _fused_loss_and_grads(
                hidden,
                weight,
                bias,
                targets,
                ignore_index,
                chunk_rows,
                mean,
                compute_dtype,
                ctx.needs_input_grad[:3],
            )
        # Kept on ctx rather than saved: backward hands them on and drops its own
        # reference, so autograd can accumulate into these buffers instead of copying.
        ctx.grads = grads
        ctx.tied = tied
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy cannot backpropagate twice through one forward "
                "(retain_graph=True): its gradients are computed once, in forward"
            )
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        # An unscaled loss (1.0, the usual case) skips two passes over the gradients.
        # Reading the value is free on CPU; elsewhere it would be a host sync (the passes
        # are cheap there), and under torch.compile a graph break.
        on_host = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
        if not on_host or grad_loss.item() != 1.0:
            for grad in (grad_hidden, grad_weight, grad_bias):
                if grad is not None:
                    grad.mul_(grad_loss)
        if ctx.tied is not None and grad_weight is not None:
            ctx.tied.hand_over(grad_weight)  # the lookup's backward adds its rows and returns it
            grad_weight = None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _fused_loss_and_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    chunk_rows: int,
    mean: bool,
    compute_dtype: torch.dtype,
    needs_grad: tuple[bool, ...],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """The loss (at least float32) and its gradients (each in its input's dtype).

    The matmuls run in `compute_dtype`. In bf16 the logits and their exponentials
    stay bf16 (a CPU mm cannot write float32 from bf16 inputs, and the gradient
    matmuls take bf16 anyway), while the row sums, the loss, each target's
    gradient (where softmax minus one-hot cancels) and the sums across chunks are
    float32.
    """
    want_hidden, want_weight, want_bias = needs_grad
    acc = torch.float32 if compute_dtype == torch.bfloat16 else compute_dtype
    h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    grad_hidden = hidden.new_empty(hidden.shape, dtype=acc) if want_hidden else None
    grad_weight = weight.new_empty(weight.shape, dtype=acc) if want_weight else None
    grad_bias = bias.new_empty((1, bias.numel()), dtype=acc) if want_bias else None
    counted = targets != ignore_index
    count = counted.sum()
    # Each counted row weighs 1 in the sum, 1 / count in the mean (nan if none counts).
    row_weight = counted.to(acc)[:, None]
    if mean:
        row_weight = row_weight / count
    safe_targets = targets.masked_fill(~counted, 0)[:, None]  # any valid index; masked below
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    b = None if bias is None else bias.to(compute_dtype)
    # One buffer for every chunk's logits, so the same memory stays in cache (oneDNN's
    # matmul writes a new tensor instead).
    buffer = None
    if not uses_onednn(h_all, w):
        buffer = h_all.new_empty(min(chunk_rows, hidden.size(0)), weight.size(0))
    # Without the max-shift, exp cannot overflow (nor can its sum over the vocabulary,
    # nor underflow below normal floats) while every |logit| <= ||h|| * max ||w|| stays
    # under `limit`: 25 for a trained `small` model, where `limit` is 78 in float32 (and
    # in bf16, whose range is float32's; its rounding of the logits, 0.4%, is inside
    # the margin of 1).
    finfo = torch.finfo(acc)
    limit = min(math.log(finfo.max / max(weight.size(0), 1)), -math.log(finfo.tiny)) - 1
    # Checking the bound reads it on the host: free on CPU, a sync on other devices,
    # and a graph break under torch.compile (whose fused log-softmax needs no help).
    largest_row = largest_bias = None
    if hidden.device.type == "cpu" and weight.numel() and not torch.compiler.is_compiling():
        largest_row = torch.linalg.vector_norm(weight, dim=1).max()
        largest_bias = 0.0 if bias is None else bias.abs().max()
    for start in range(0, hidden.size(0), chunk_rows):
        # The last chunk's logits (one tensor under three names) are let go before this
        # chunk's are made: oneDNN writes a new tensor, and two would be held at once.
        logits = exps = grad = None
        rows, first = slice(start, start + chunk_rows), start == 0
        h, target = h_all[rows], safe_targets[rows]
        logits = mm(h, w.T, b, out=None if buffer is None else buffer[: h.size(0)])  # (rows, vocab)
        unshifted = largest_row is not None and bool(
            torch.linalg.vector_norm(hidden[rows], dim=1).max() * largest_row + largest_bias
            <= limit
        )
        exps, sums, nll = exp_logits_and_nll(logits, target, unshifted)
        total += (nll * counted[rows, None]).sum(dtype=torch.float64)
        if not (want_hidden or want_weight or want_bias):
            continue
        # d(mean nll)/d(logits) = (exps / sums - one_hot) * row weight
        #                       = (exps - sums * one_hot) * (row weight / sums):
        # the last factor goes on the (rows, C) side of each matmul, a 40x smaller
        # pass than scaling the (rows, vocab) gradient. At the target, exps - sums
        # = sums * (p - 1) = sums * expm1(-nll), exact even where p is close to 1.
        grad = set_at_targets(exps, target, sums * torch.expm1(-nll))
        scale = row_weight[rows] / sums
        if want_hidden:
            torch.mul(mm(grad, w), scale, out=grad_hidden[rows])
        if want_weight:
            grad_weight = _accumulate(grad_weight, grad.T, (h * scale).to(compute_dtype), first)
        if want_bias:  # the bias gradient sums the rows' gradients
            grad_bias = _accumulate(grad_bias, scale.T.to(compute_dtype), grad, first)
    if hidden.size(0) == 0:
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
    if grad_bias is not None:
        grad_bias = grad_bias.view(-1)
    grads = (
        None if grad_hidden is None else grad_hidden.to(hidden.dtype),
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
    # 0 / 0 gives nan when every target is ignored, as F.cross_entropy does.
    loss = total / count if mean else total
    return loss.to(torch.promote_types(hidden.dtype, acc)), grads


def _accumulate(total: Tensor, a: Tensor, b: Tensor, first: bool) -> Tensor:
    """`total = a @ b` on the first chunk, `total += a @ b` after: the product in a's dtype,
    the sum in total's (no zero-filled accumulator is read). Returns the total: oneDNN's
    first product is a new tensor, which replaces `total`. oneDNN writes every product
    anew, so a total larger than CHUNK_BYTES (the weight's gradient at a 250,000-word
    vocabulary: 244 MiB) is summed in place by torch.mm instead: a second one of it would
    cost more memory than the faster product saves time (at 64 rows it is not faster)."""
    if uses_onednn(a, b) and total.numel() * total.element_size() <= CHUNK_BYTES:
        product = mm(a, b)
        return product if first else total.add_(product)
    if a.dtype != total.dtype:
        # ACCUMULATE_ROWS of the product at a time: a whole bf16 (vocab, C) product is
        # 122 MiB more at a 250,000-word vocabulary. PTB's 10,000 rows are one slice.
        for start in range(0, total.size(0), ACCUMULATE_ROWS):
            rows = slice(start, start + ACCUMULATE_ROWS)
            product = torch.mm(a[rows], b)
            total[rows].copy_(product) if first else total[rows].add_(product)
    elif first:
        torch.mm(a, b, out=total)
    else:
        total.addmm_(a, b)
    return total


def set_at_targets(values: Tensor, target: Tensor, new: Tensor) -> Tensor:
    """`values.scatter_(1, target, new)` for (rows, vocab) `values`, (rows, 1) `target` and `new`.

    Through the flat view: a bf16 `scatter_` on CPU costs a pass over all of
    `values` (1.2 ms for 512 x 10,000 on the AMX Xeon of 2026-12-03, 2 threads), this
    one write per row.
    """
    rows, vocab = values.shape
    flat = target[:, 0] + torch.arange(rows, device=target.device) * vocab
    values.view(-1).index_copy_(0, flat, new[:, 0].to(values.dtype))
    return values


def exp_logits_and_nll(
    logits: Tensor, target: Tensor, unshifted: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """exp of `logits` (rows, vocab) in place, its row sums, and each row's -log softmax at `target`.

    The softmax is exps / sums. `unshifted` (the caller has bounded every logit
    well below exp's overflow): one exp pass and one sum, the cheapest on a
    CPU. Otherwise a log-softmax, which shifts each row by its max, then exp:
    one more pass, and the sums are 1. The sums and the NLL are at least
    float32; bf16 logits get bf16 exponentials (their log-softmax is float32).
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    if unshifted:
        target_logit = logits.gather(1, target).to(acc)
        exps = logits.exp_()
        # bf16 sums accumulate in float32, then round to bf16: 2^-9 of the NLL at most, a
        # tenth of the logits' own rounding (a float32 sum of bf16 costs a whole copy).
        sums = exps.sum(dim=-1, keepdim=True).to(acc)
        return exps, sums, sums.log() - target_logit
    if logits.dtype == acc:
        log_probs = torch.log_softmax(logits, dim=-1, out=logits)
    else:
        log_probs = torch.log_softmax(logits, dim=-1, dtype=acc)
    nll = -log_probs.gather(1, target)
    exps = log_probs.exp_()
    return (exps if exps is logits else logits.copy_(exps)), torch.ones_like(nll), nll


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    bias: Tensor | None = None,
    tied: TiedGradient | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=...)`, without the logits.

    `hidden` (N, C), `weight` (vocab, C), `bias` (vocab,) or None, `targets` (N,). `reduction="mean"`
    gives the mean over the counted targets (training's loss); `"sum"` gives
    `(summed NLL, number of counted targets)`, what a perplexity over a whole
    split accumulates. In bf16 (bf16 autocast, or `trainer.precision=bf16-true`'s
    bf16 weights) the matmuls run in bf16 and the rest in float32, and the loss is
    float32. float16 falls back to the plain computation with float32 logits.
    `chunk_rows` None: `rows_per_chunk` of the vocabulary and the matmul dtype. `tied`: the
    weight's gradient goes to the input lookup's backward instead (lmlab.tied_gradient).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden (N, C) and targets (N,), "
            f"got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    compute_dtype = matmul_dtype(hidden, weight)
    if compute_dtype == torch.float16:
        half_bias = None if bias is None else bias.half()  # fp16 autocast keeps fp32 biases
        with torch.autocast(hidden.device.type, enabled=False):
            logits = F.linear(hidden.half(), weight.half(), half_bias).float()
        loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    else:
        mean = reduction == "mean"
        chunk_rows = chunk_rows or rows_per_chunk(weight.size(0), compute_dtype)
        loss = _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, ignore_index, chunk_rows, mean, compute_dtype, tied
        )
    if reduction == "mean":
        return loss
    return loss, (targets != ignore_index).sum()


def matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the output layer's matmuls run in: autocast's if it is on, else the inputs'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    for low in (torch.bfloat16, torch.float16):
        if low in (hidden.dtype, weight.dtype):
            return low
    return torch.promote_types(hidden.dtype, weight.dtype)


def output_layer(
    head: torch.nn.Linear,
    hidden: Tensor,
    targets: Tensor | None = None,
    reduction: str = "mean",
    tied: TiedGradient | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """A model's output layer on its final hidden states (B, T, C): the logits (B, T, vocab), or
    with `targets` (B, T) the loss fused with it (`linear_cross_entropy`), logits never made.
    `tied`: the input lookup's carrier (lmlab.tied_gradient), where the two share the weight."""
    if targets is None:
        return head(hidden)
    return linear_cross_entropy(
        hidden.flatten(0, 1),
        head.weight,
        targets.flatten(),
        reduction=reduction,
        bias=head.bias,
        tied=tied,
    )
