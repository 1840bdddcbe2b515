"""Cross-entropy fused with the output layer, computed a chunk of rows at a time.

`F.cross_entropy(hidden @ weight.T, targets)` materialises the logits of every
position (2,048 x 10,000 floats, 82 MB, for a batch of 32 x 64 on PTB), then
walks them several more times: log-softmax, its backward, a zero-filled
gradient. On a CPU those passes over memory cost as much as the matmuls.
Here each chunk of rows gets its logits, its log-sum-exp, and right away its
gradient (softmax minus one-hot) while the chunk is still in cache; both
gradients are finished in the forward pass and only scaled in backward. Same
loss and gradients up to float rounding (tests/test_loss.py), about 1.2x the
training throughput of the `small` model on 2 CPU cores
(benchmarks/train_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows per chunk: 128 x 10,000 fp32 logits is 5 MB, which stays in a CPU's last-level cache.
CHUNK_ROWS = 128


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
        grad_weight = torch.zeros_like(weight) if want_weight else None
        counted = targets != ignore_index
        safe_targets = targets.masked_fill(~counted, 0)[:, None]  # any valid index; masked below
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, target, keep = hidden[rows], safe_targets[rows], counted[rows, None]
            logits = h @ weight.T  # (rows, vocab)
            target_logit = logits.gather(1, target)
            row_max = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()  # in place: each pass over the chunk costs
            row_sum = exp.sum(dim=-1, keepdim=True)
            nll = (row_max + row_sum.log() - target_logit) * keep
            total += nll.sum(dtype=torch.float64)
            if want_hidden or want_weight:
                # d(sum of nll)/d(logits) = softmax - one_hot, zero on ignored rows.
                grad = exp.mul_(keep / row_sum)
                grad.scatter_add_(1, target, -keep.to(grad.dtype))
                if want_hidden:
                    torch.mm(grad, weight, out=grad_hidden[rows])
                if want_weight:
                    grad_weight.addmm_(grad.T, h)
        count = counted.sum()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        # 0 / 0 gives nan when every target is ignored, as F.cross_entropy does.
        return (total / count).to(hidden.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (
            None if grad_hidden is None else grad_hidden * scale,
            None if grad_weight is None else grad_weight * scale,
            None,
            None,
            None,
        )


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
