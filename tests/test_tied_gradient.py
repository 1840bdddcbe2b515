"""The tied weight's two gradients (input lookup, fused output layer) summed in one buffer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lmlab.models import build_model, preset
from lmlab.tied_gradient import tied_gradient

VOCAB = 3_000  # a weight large enough that a copy of it stands out among backward's tensors


def tiny(name: str):
    torch.manual_seed(0)
    config = preset(name, vocab_size=VOCAB, block_size=16)
    config.dropout = 0.0
    return build_model(config).train()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (3, 12), generator=generator)
    return idx, torch.randint(0, VOCAB, (3, 12), generator=generator)


def reference_grads(model, batches) -> dict[str, torch.Tensor]:
    """Every parameter's gradient through plain autograd: the logits, then F.cross_entropy."""
    model.zero_grad(set_to_none=True)
    for idx, targets in batches:
        logits = model(idx)  # no targets: the head as an nn.Linear, the lookup as F.embedding
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["tiny", "llama_tiny"])
def test_the_tied_weights_gradient_is_the_sum_autograd_makes(name: str) -> None:
    model = tiny(name)
    assert model.lm_head.weight is model.token_embedding.weight
    batches = [batch(1), batch(2)]  # two micro-batches: the second adds to the first
    expected = reference_grads(model, batches)
    model.zero_grad(set_to_none=True)
    for idx, targets in batches:
        model(idx, targets=targets).backward()
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[param_name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "llama_tiny"])
def test_backward_makes_no_second_tensor_of_the_weights_size(name: str) -> None:
    model = tiny(name)
    weight = model.token_embedding.weight
    idx, targets = batch(3)
    loss = model(idx, targets=targets)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as backward:
        loss.backward()
    # (gpt's position table still takes F.embedding's backward: 16 positions, not the vocabulary)
    largest = max(event.cpu_memory_usage for event in backward.events())
    assert 0 < largest < weight.numel() * weight.element_size()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_no_carrier_where_the_weights_are_not_shared_or_no_gradient_is_made() -> None:
    weight = torch.nn.Parameter(torch.randn(5, 3))
    targets = torch.zeros(2, dtype=torch.long)
    assert tied_gradient(weight, weight, targets) is not None
    assert tied_gradient(weight, torch.nn.Parameter(torch.randn(5, 3)), targets) is None
    assert tied_gradient(weight, weight, None) is None  # logits: no loss to hand over
    with torch.no_grad():
        assert tied_gradient(weight, weight, targets) is None
    frozen = torch.nn.Parameter(torch.randn(5, 3), requires_grad=False)
    assert tied_gradient(frozen, frozen, targets) is None
