"""Cross-entropy fused with the output layer, computed a chunk of rows at a time.

`F.cross_entropy(hidden @ weight.T, targets)` materialises the logits of every
position (2,048 x 10,000 floats, 82 MB, for a batch of 32 x 64 on PTB), then
walks them several more times: log-softmax, its backward, a zero-filled
gradient. On a CPU those passes over memory cost as much as the matmuls.
Here each chunk of rows gets its logits, its log-sum-exp, and right away its
gradient (softmax minus one-hot, over the number of counted targets) while
the chunk is still in cache; both gradients are finished in the forward pass,
and backward hands them on, scaled only when the loss was. Same loss and
gradients up to float rounding (tests/test_loss.py), about 1.2x the training
throughput of the `small` model on 2 CPU cores (benchmarks/train_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows per chunk: 512 x 10,000 fp32 logits is 20 MB, which stays in a server CPU's
# last-level cache. Measured on 2 cores for the `small` model's step: 128 rows is 1-2%
# slower (the matmuls pack the whole weight once per chunk), 1,024 rows 4% slower.
CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        chunk_rows: int,
    ) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        counted = targets != ignore_index
        count = counted.sum()
        # The gradient of the mean: each counted row weighs 1 / count (nan if none counts).
        row_weight = (counted.to(hidden.dtype) / count)[:, None]
        safe_targets = targets.masked_fill(~counted, 0)[:, None]  # any valid index; masked below
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        # One buffer for every chunk's logits, so the same memory stays in cache.
        buffer = hidden.new_empty(min(chunk_rows, hidden.size(0)), weight.size(0))
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, target = hidden[rows], safe_targets[rows]
            logits = torch.mm(h, weight.T, out=buffer[: h.size(0)])  # (rows, vocab)
            target_logit = logits.gather(1, target)
            row_max = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()  # in place: each pass over the chunk costs
            row_sum = exp.sum(dim=-1, keepdim=True)
            nll = (row_max + row_sum.log() - target_logit) * counted[rows, None]
            total += nll.sum(dtype=torch.float64)
            if want_hidden or want_weight:
                # d(mean nll)/d(logits) = (softmax - one_hot) / count, zero on ignored rows.
                weight_of_row = row_weight[rows]
                grad = exp.mul_(weight_of_row / row_sum)
                grad.scatter_add_(1, target, -weight_of_row)
                if want_hidden:
                    torch.mm(grad, weight, out=grad_hidden[rows])
                if want_weight and start == 0:  # no zero-filled accumulator to read
                    torch.mm(grad.T, h, out=grad_weight)
                elif want_weight:
                    grad_weight.addmm_(grad.T, h)
        if want_weight and hidden.size(0) == 0:
            grad_weight.zero_()
        # Kept on ctx rather than saved: backward hands them on and drops its own
        # reference, so autograd can accumulate into these buffers instead of copying.
        ctx.grads = (grad_hidden, grad_weight)
        # 0 / 0 gives nan when every target is ignored, as F.cross_entropy does.
        return (total / count).to(hidden.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy cannot backpropagate twice through one forward "
                "(retain_graph=True): its gradients are computed once, in forward"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # An unscaled loss (1.0, the usual case) skips two passes over the gradients.
        # Reading the value is free on CPU; elsewhere it would be a host sync, and the
        # passes are cheap there.
        if grad_loss.device.type != "cpu" or grad_loss.item() != 1.0:
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    chunk_rows: int = CHUNK_ROWS,
) -> Tensor:
    """Mean of `F.cross_entropy(hidden @ weight.T, targets, ignore_index=...)`, without the logits.

    `hidden` (N, C), `weight` (vocab, C), `targets` (N,). Under autocast, or
    with 16-bit weights (`trainer.precision=bf16-true`), this falls back to the
    plain computation with float32 logits: a softmax summed in 16 bits would
    lose the loss's precision, and mixed precision already makes the logits
    cheaper.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy needs hidden (N, C) and targets (N,), "
            f"got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    half = hidden.dtype not in (torch.float32, torch.float64)
    if half or torch.is_autocast_enabled(hidden.device.type):
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
