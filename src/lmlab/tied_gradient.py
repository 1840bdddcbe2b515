"""One gradient buffer for a weight that is both the input embedding and the output layer.

Autograd gives a tied weight two gradients and adds them: the output layer's,
which the fused loss computes whole in its forward pass (lmlab.loss), and the
lookup's, which `F.embedding`'s backward makes as a dense (vocab, C) tensor of
zeros with the looked-up rows added. At a 247,564-word vocabulary that is a
second 244 MiB tensor, held while the two are added, the peak of a float32
training step (a sparse lookup gradient does not help: autograd adds a sparse
gradient to a dense one out of place). Here the fused loss hands its gradient
to the lookup's backward, which adds its rows into it in place and returns the
sum: the weight's one gradient, as autograd would have summed it.

Autograd runs the loss's backward before the lookup's (the lookup feeds the
loss), so the hand-over always happens first. Where the loss does not take its
fused path or makes no weight gradient, the lookup makes its own, as
`F.embedding` does. Used only in eager mode on plain tensors: under
torch.compile and for FSDP's sharded parameters the usual path runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class TiedGradient:
    """Carries the output layer's weight gradient from the fused loss's backward to the lookup's."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def hand_over(self, grad: Tensor) -> None:
        self.grad = grad

    def take(self) -> Tensor | None:
        grad, self.grad = self.grad, None
        return grad


def tied_gradient(embedding: Tensor, head: Tensor, targets: Tensor | None) -> TiedGradient | None:
    """A carrier where one forward both looks up `embedding` and scores `targets` with `head`
    as the same weight, and a gradient is to be made (eager, a plain tensor); else None."""
    if targets is None or head is not embedding or not embedding.requires_grad:
        return None
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if type(embedding) is not torch.nn.Parameter and type(embedding) is not Tensor:
        return None
    return TiedGradient()


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: Tensor, weight: Tensor, tied: TiedGradient) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return F.embedding(idx, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor, None]:
        (idx,) = ctx.saved_tensors
        grad = ctx.tied.take()
        if grad is None:  # the loss made none (not fused, or no weight gradient wanted)
            grad = grad_out.new_zeros(ctx.weight_shape)
        rows = grad_out.reshape(-1, ctx.weight_shape[1]).to(grad.dtype)
        return None, grad.index_add_(0, idx.reshape(-1), rows), None


def lookup(idx: Tensor, weight: Tensor, tied: TiedGradient | None) -> Tensor:
    """`F.embedding(idx, weight)`; with `tied`, its gradient is added into the fused loss's."""
    if tied is None:
        return F.embedding(idx, weight)
    return _TiedLookup.apply(idx, weight, tied)
