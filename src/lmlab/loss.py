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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows per chunk: 512 x 10,000 fp32 logits is 20 MB, which stays in a server CPU's
# last-level cache. Measured on 2 cores for the `small` model's step: 256 rows is 2%
# slower (the matmuls pack the whole weight once per chunk), 1,024 rows 4% slower and
# one chunk of 2,048 rows 8%.
CHUNK_ROWS = 512
IGNORE_INDEX = -100  # the target of a position that is not scored (padding), as in F.cross_entropy


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
    ) -> Tensor:
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        grad_bias = torch.empty_like(bias).view(1, -1) if want_bias else None
        counted = targets != ignore_index
        count = counted.sum()
        # Each counted row weighs 1 in the sum, 1 / count in the mean (nan if none counts).
        row_weight = counted.to(hidden.dtype)[:, None]
        if mean:
            row_weight = row_weight / count
        safe_targets = targets.masked_fill(~counted, 0)[:, None]  # any valid index; masked below
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        # One buffer for every chunk's logits, so the same memory stays in cache.
        buffer = hidden.new_empty(min(chunk_rows, hidden.size(0)), weight.size(0))
        # Without the max-shift, exp cannot overflow (nor can its sum over the vocabulary,
        # nor underflow below normal floats) while every |logit| <= ||h|| * max ||w|| stays
        # under `limit`: 25 for a trained `small` model, where `limit` is 78 in float32.
        finfo = torch.finfo(hidden.dtype)
        limit = min(math.log(finfo.max / max(weight.size(0), 1)), -math.log(finfo.tiny)) - 1
        # Checking the bound reads it on the host: free on CPU, a sync on other devices,
        # and a graph break under torch.compile (whose fused log-softmax needs no help).
        largest_row = largest_bias = None
        if hidden.device.type == "cpu" and weight.numel() and not torch.compiler.is_compiling():
            largest_row = torch.linalg.vector_norm(weight, dim=1).max()
            largest_bias = 0.0 if bias is None else bias.abs().max()
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, target = hidden[rows], safe_targets[rows]
            logits = torch.mm(h, weight.T, out=buffer[: h.size(0)])  # (rows, vocab)
            if bias is not None:
                # Added after the matmul: addmm into `out` first copies the broadcast bias
                # there, a full extra pass (3.5 ms of a 67 ms LSTM step on 2 CPU cores).
                logits.add_(bias)
            unshifted = largest_row is not None and bool(
                torch.linalg.vector_norm(h, dim=1).max() * largest_row + largest_bias <= limit
            )
            exps, sums, nll = exp_logits_and_nll(logits, target, unshifted)
            total += (nll * counted[rows, None]).sum(dtype=torch.float64)
            if want_hidden or want_weight or want_bias:
                # d(mean nll)/d(logits) = (exps / sums - one_hot) * row weight
                #                       = (exps - sums * one_hot) * (row weight / sums):
                # the last factor goes on the (rows, C) side of each matmul, a 40x
                # smaller pass than scaling the (rows, vocab) gradient.
                grad = exps.scatter_add_(1, target, -sums)
                scale = row_weight[rows] / sums
                if want_hidden:
                    torch.mm(grad, weight, out=grad_hidden[rows]).mul_(scale)
                if want_weight and start == 0:  # no zero-filled accumulator to read
                    torch.mm(grad.T, h * scale, out=grad_weight)
                elif want_weight:
                    grad_weight.addmm_(grad.T, h * scale)
                if want_bias and start == 0:  # the bias gradient sums the rows' gradients
                    torch.mm(scale.T, grad, out=grad_bias)
                elif want_bias:
                    grad_bias.addmm_(scale.T, grad)
        if hidden.size(0) == 0:
            for grad in (grad_weight, grad_bias):
                if grad is not None:
                    grad.zero_()
        # Kept on ctx rather than saved: backward hands them on and drops its own
        # reference, so autograd can accumulate into these buffers instead of copying.
        ctx.grads = (grad_hidden, grad_weight, None if grad_bias is None else grad_bias.view(-1))
        # 0 / 0 gives nan when every target is ignored, as F.cross_entropy does.
        return (total / count if mean else total).to(hidden.dtype)

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
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def exp_logits_and_nll(
    logits: Tensor, target: Tensor, unshifted: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """exp of `logits` (rows, vocab) in place, its row sums, and each row's -log softmax at `target`.

    The softmax is exps / sums. `unshifted` (the caller has bounded every logit
    well below exp's overflow): one exp pass and one sum, the cheapest on a
    CPU. Otherwise a log-softmax, which shifts each row by its max, then exp:
    one more pass, and the sums are 1.
    """
    if unshifted:
        target_logit = logits.gather(1, target)
        exps = logits.exp_()
        sums = exps.sum(dim=-1, keepdim=True)
        return exps, sums, sums.log() - target_logit
    log_probs = torch.log_softmax(logits, dim=-1, out=logits)
    nll = -log_probs.gather(1, target)
    return log_probs.exp_(), torch.ones_like(nll), nll


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int = CHUNK_ROWS,
    bias: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=...)`, without the logits.

    `hidden` (N, C), `weight` (vocab, C), `bias` (vocab,) or None, `targets` (N,). `reduction="mean"`
    gives the mean over the counted targets (training's loss); `"sum"` gives
    `(summed NLL, number of counted targets)`, what a perplexity over a whole
    split accumulates. Under autocast, or with 16-bit weights
    (`trainer.precision=bf16-true`), this falls back to the plain computation
    with float32 logits: a softmax summed in 16 bits would lose the loss's
    precision, and mixed precision already makes the logits cheaper.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden (N, C) and targets (N,), "
            f"got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    half = hidden.dtype not in (torch.float32, torch.float64)
    if half or torch.is_autocast_enabled(hidden.device.type):
        logits = F.linear(hidden, weight, bias).float()
        loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    else:
        mean = reduction == "mean"
        loss = _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, ignore_index, chunk_rows, mean
        )
    if reduction == "mean":
        return loss
    return loss, (targets != ignore_index).sum()
