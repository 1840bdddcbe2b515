"""Dynamic evaluation scores each segment before it learns from it, and lr 0 is static evaluation."""

from __future__ import annotations

import pytest
import torch

from lmlab.dynamic_eval import DynamicEval, Update, dynamic_perplexity, gradient_rms
from lmlab.evaluation import perplexity
from lmlab.models import build_model
from lmlab.models.gpt import GPTConfig
from lmlab.models.lstm import LSTMConfig

VOCAB = 30
CONTEXT = 16


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt":
        config = GPTConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=1, n_head=2, n_embd=16)
    else:
        config = LSTMConfig(vocab_size=VOCAB, block_size=8, n_layer=2, n_embd=16, n_hidden=16)
    return build_model(config).eval()


def stream(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def static_perplexity(model: torch.nn.Module, tokens: torch.Tensor, segment: int) -> dict:
    """The same segments, read without learning: eval.py's own perplexity."""
    if model.carries_state:
        return perplexity(model, tokens, seq_len=segment, batch_size=1, order="contiguous")
    return perplexity(model, tokens, seq_len=CONTEXT, stride=segment, batch_size=1)


@pytest.mark.parametrize("family", ["gpt", "lstm"])
@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_without_a_learning_rate_it_is_static_evaluation(family: str, method: str):
    model, tokens = tiny(family), stream(101)
    rms = gradient_rms(model, stream(200, seed=2), seq_len=8, batch_size=4, max_batches=5)
    settings = DynamicEval(lr=0.0, decay=0.0, method=method, segment=5)
    dynamic = dynamic_perplexity(model, tokens, settings, context=CONTEXT, grad_rms=rms)
    static = static_perplexity(model, tokens, segment=5)
    assert dynamic["tokens"] == static["tokens"] == 101  # every token scored once
    assert dynamic["ppl"] == static["ppl"]  # exactly: the same windows, scored the same way


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_a_token_never_changes_the_score_of_itself_or_of_anything_before_it(family: str):
    # Segments of one token: a segment's score is one token's, learned from right after.
    model, tokens = tiny(family), stream(60)
    settings = DynamicEval(lr=0.5, decay=0.01, method="sgd", segment=1)
    before = dynamic_perplexity(model, tokens, settings, context=CONTEXT)["scores"]
    changed = tokens.clone()
    k = 40
    changed[k] = (tokens[k] + 1) % VOCAB
    after = dynamic_perplexity(model, changed, settings, context=CONTEXT)["scores"]
    # The segment scoring target k: the Transformer's first window scores CONTEXT targets.
    index = k if model.carries_state else k - CONTEXT + 1
    assert before[:index] == after[:index]  # bit for bit: nothing before k saw token k
    assert before[index] != after[index]  # its own target changed
    assert all(b != a for b, a in zip(before[index + 1 :], after[index + 1 :], strict=True))


@pytest.mark.parametrize("family, lr", [("gpt", 0.3), ("lstm", 1.0)])
def test_learning_from_the_text_helps_on_text_that_repeats(family: str, lr: float):
    model = tiny(family)
    tokens = stream(12).repeat(15)  # a 12-token sentence, 15 times
    static = static_perplexity(model, tokens, segment=4)["ppl"]
    settings = DynamicEval(lr=lr, decay=0.0, method="sgd", segment=4)
    dynamic = dynamic_perplexity(model, tokens, settings, context=CONTEXT)
    assert dynamic["ppl"] < 0.5 * static
    # and the model it was handed is unchanged afterwards
    assert static_perplexity(model, tokens, segment=4)["ppl"] == pytest.approx(static, rel=1e-6)


def test_gradient_statistics_are_positive_and_shaped_as_the_weights():
    model = tiny("gpt")
    rms = gradient_rms(model, stream(300), seq_len=8, batch_size=4, max_batches=3)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [s.shape for s in rms] == [p.shape for p in params]
    assert all(bool((s >= 0).all()) for s in rms) and any(bool((s > 0).any()) for s in rms)
    assert all(p.grad is None for p in params)  # it leaves no gradients behind


def test_rms_needs_its_statistics():
    with pytest.raises(ValueError, match="needs the gradient statistics"):
        dynamic_perplexity(
            tiny("gpt"), stream(20), DynamicEval(lr=1e-3, decay=0.0, method="rms"), context=CONTEXT
        )


@pytest.mark.parametrize("method", ["sgd", "rms"])
def test_one_update_is_the_rule_as_written(method: str):
    generator = torch.Generator().manual_seed(3)
    trained = [torch.randn(7, 5, generator=generator), torch.randn(5, generator=generator)]
    rms = [torch.rand(t.shape, generator=generator) for t in trained]
    settings = DynamicEval(lr=0.1, decay=0.05, method=method, segment=5)
    params = [(p0 + 0.1 * torch.randn(p0.shape, generator=generator)) for p0 in trained]
    for p in params[:1]:  # the second weight gets no gradient: it is left alone
        p.grad = torch.randn(p.shape, generator=generator)
    before = [p.clone() for p in params]
    Update(settings, trained, rms)(params)
    if method == "sgd":
        step, pull = 0.1, 0.05
    else:  # RMS: lr / (s + eps), and the pull decay * s / mean(s), capped at 1
        step = 0.1 / (rms[0] + settings.epsilon)
        mean = (rms[0].mean() + rms[1].mean()) / 2
        pull = (rms[0] / mean).clamp(max=1 / 0.05) * 0.05
    expected = before[0] - step * params[0].grad + pull * (trained[0] - before[0])
    torch.testing.assert_close(params[0], expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(params[1], before[1])
