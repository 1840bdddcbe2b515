"""The neural cache: lambda 0 is static evaluation, it only looks back, and it is Grave et al.'s."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.dynamic_eval import DynamicEval, dynamic_perplexity
from lmlab.evaluation import perplexity
from lmlab.models import build_model
from lmlab.models.gpt import GPTConfig
from lmlab.models.llama import LlamaConfig
from lmlab.models.lstm import LSTMConfig
from lmlab.neural_cache import NeuralCache, cache_perplexity

VOCAB = 30
CONTEXT = 64
FAMILIES = ["gpt", "llama", "lstm"]


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt":
        config = GPTConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=1, n_head=2, n_embd=16)
    elif family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, block_size=CONTEXT, n_layer=1, n_head=2, n_embd=16)
    else:
        config = LSTMConfig(vocab_size=VOCAB, block_size=8, n_layer=2, n_embd=16, n_hidden=16)
    return build_model(config).eval()


def stream(n: int, seed: int = 1, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


def reference_nll(model: torch.nn.Module, tokens: torch.Tensor, cache: NeuralCache) -> list[float]:
    """Each token's NLL under the cache, the obvious way: the whole text in one forward, then
    for each position a loop over the earlier ones, in float64."""
    inputs = torch.cat([torch.tensor([0]), tokens[:-1]])[None]
    with torch.no_grad():
        hidden = model.hidden_states(inputs)[0].double()  # (T, C)
        p_model = torch.softmax(model.output(hidden[None].float())[0].double(), dim=-1)
    nll = []
    for t in range(len(tokens)):
        p = p_model[t].clone()
        held = range(max(0, t - cache.size), t)
        if held:
            weights = torch.softmax(
                torch.stack([cache.theta * hidden[t] @ hidden[i] for i in held]), dim=0
            )
            p_cache = torch.zeros(VOCAB, dtype=torch.float64)
            for weight, i in zip(weights, held, strict=True):
                p_cache[tokens[i]] += weight  # the token that followed position i
            p = (1 - cache.lambda_) * p + cache.lambda_ * p_cache
        nll.append(-math.log(float(p[tokens[t]])))
    return nll


@pytest.mark.parametrize("family", FAMILIES)
def test_without_a_share_for_the_cache_it_is_static_evaluation(family: str):
    model, tokens = tiny(family), stream(101)
    cached = cache_perplexity(model, tokens, NeuralCache(50, 1.0, 0.0), seq_len=16, stride=4)
    if model.carries_state:  # one stream, its state carried: the contiguous order
        static = perplexity(model, tokens, seq_len=16, batch_size=1, order="contiguous")
    else:
        static = perplexity(model, tokens, seq_len=16, stride=4, batch_size=1)
    assert cached["tokens"] == static["tokens"] == 101
    assert cached["ppl"] == cached["model_ppl"] == static["ppl"]  # exactly, not approximately


@pytest.mark.parametrize("family", FAMILIES)
def test_it_is_grave_et_al_s_cache(family: str):
    # Windows of 8 (an LSTM's state carried across them, a Transformer's windows of 16
    # advancing by 8 hold the text's first 16 tokens at most) against one pass over the
    # whole text; a cache of 20 holds fewer positions than the text has, so it slides.
    model, tokens = tiny(family), stream(40)
    cache = NeuralCache(size=20, theta=0.7, lambda_=0.3)
    seq_len = 8 if model.carries_state else CONTEXT  # a Transformer: every token sees it all
    cached = cache_perplexity(model, tokens, cache, seq_len=seq_len, stride=8)
    reference = reference_nll(model, tokens, cache)
    assert cached["nll"] == pytest.approx(sum(reference) / len(reference), rel=1e-5)
    first = 8 if model.carries_state else 40  # the first window's targets
    assert cached["scores"][0] == pytest.approx(sum(reference[:first]), rel=1e-5)


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_a_token_never_changes_the_score_of_itself_or_of_anything_before_it(family: str):
    # Windows that score one token each: a window's score is one token's.
    model, tokens = tiny(family), stream(60)
    cache = NeuralCache(size=30, theta=1.0, lambda_=0.5)
    step = {"seq_len": 1} if model.carries_state else {"seq_len": 16, "stride": 1}
    before = cache_perplexity(model, tokens, cache, **step)["scores"]
    changed = tokens.clone()
    k = 40
    changed[k] = (tokens[k] + 1) % VOCAB
    after = cache_perplexity(model, changed, cache, **step)["scores"]
    index = k if model.carries_state else k - 16 + 1  # the window scoring target k
    assert before[:index] == after[:index]  # bit for bit: nothing before k saw token k
    assert before[index] != after[index]  # its own target changed
    # and the cache remembers it: a later token's score moves (the model alone, a
    # Transformer's, would not once k leaves its window)
    assert before[index + 16 :] != after[index + 16 :]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rare_word_that_recurs_costs_less_with_the_cache(family: str):
    # Common words 0..9, and word 29 after each `3`: never seen in training, then often.
    model = tiny(family)
    tokens = stream(160, high=10)
    rare = 29
    tokens = torch.stack([tokens, torch.where(tokens == 3, rare, -1)], dim=1).flatten()
    tokens = tokens[tokens >= 0]
    step = {"seq_len": 1} if model.carries_state else {"seq_len": 16, "stride": 1}
    scores = {
        lam: torch.tensor(
            cache_perplexity(model, tokens, NeuralCache(100, 1.0, lam), **step)["scores"]
        )
        for lam in (0.0, 0.2)
    }
    first = int((tokens == rare).nonzero()[0])
    later = (tokens == rare).nonzero()[:, 0]
    later = later[later > first + 20]
    assert len(later) > 10
    # the window scoring target i: i itself (windows of one), or i - 15 (the first of 16)
    index = later if model.carries_state else later - 15
    with_cache, without = scores[0.2][index], scores[0.0][index]
    # An untrained LSTM's states hardly tell its inputs apart, so its cache is close to a
    # count of the recent words (0.95 of the loss); the Transformers' match the `3`s (about 0.45).
    assert float(with_cache.mean()) < 0.97 * float(without.mean())
    if not model.carries_state:
        assert bool((with_cache < without).all())  # every time it recurs


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_with_dynamic_evaluation_it_runs_over_the_adapting_model(family: str):
    model, tokens = tiny(family), stream(12).repeat(8)
    cache = NeuralCache(size=40, theta=1.0, lambda_=0.2)
    still = DynamicEval(lr=0.0, decay=0.0, method="sgd", segment=4)
    static = dynamic_perplexity(model, tokens, still, context=16, cache=cache)
    # no learning: the cache over the trained model's states, the same windows
    alone = cache_perplexity(
        model, tokens, cache, seq_len=4 if model.carries_state else 16, stride=4
    )
    assert static["cache"]["ppl"] == pytest.approx(alone["ppl"], rel=1e-6)
    assert static["ppl"] == pytest.approx(alone["model_ppl"], rel=1e-6)
    learning = DynamicEval(lr=0.3, decay=0.0, method="sgd", segment=4)
    both = dynamic_perplexity(model, tokens, learning, context=16, cache=cache)
    assert both["cache"] == {"size": 40, "theta": 1.0, "lambda": 0.2} | {
        key: both["cache"][key] for key in ("nll", "ppl")
    }
    assert both["ppl"] < static["ppl"]  # it learned from the text
    assert both["cache"]["ppl"] < both["ppl"]  # and the cache helps on top of that
