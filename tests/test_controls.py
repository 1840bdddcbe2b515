"""Hugging Face generate's controls, as pure functions on fixed scores and through every strategy."""

from __future__ import annotations

import pytest
import torch
from test_decoding import TableLM as _Table
from torch import Tensor

from lmlab.decoding import (
    Controls,
    banned_ngram_tokens,
    beam_search,
    generate,
    hold_back_eos,
    repetition_penalty,
    suppress,
)
from lmlab.generation import Decoding, continue_prompts, until_stop
from lmlab.tokenizers import Tokenizer
from lmlab.vocab import Vocabulary


class TableLM(_Table):
    """The bigram table of test_decoding, with a parameter (the entry points look one up)."""

    def __init__(self, probs):
        super().__init__(probs)
        self.zero = torch.nn.Parameter(torch.zeros(()))


INF = float("-inf")
# Each token's most likely successor is itself: an LM that loves to repeat.
STUCK = [[0.55 if j == i else 0.45 / 5 for j in range(6)] for i in range(6)]
STRATEGIES = [
    dict(temperature=0.0),  # greedy
    dict(temperature=1.0, generator=torch.Generator().manual_seed(0)),  # sampling
    dict(num_beams=3),  # beam search
]


def decode(model, prompt: Tensor, new: int, strategy: dict, **kwargs) -> Tensor:
    if "num_beams" in strategy:
        return beam_search(model, prompt, new, **strategy, **kwargs)[0]
    return generate(model, prompt, new, **strategy, **kwargs)


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores_of_seen_tokens():
    scores = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    tokens = torch.tensor([[0, 1, 3]])
    real = torch.tensor([[False, True, True]])  # token 0 is left padding: not "seen"
    got = repetition_penalty(scores, tokens, 2.0, real)
    assert torch.equal(got, torch.tensor([[2.0, -2.0, 3.0, -8.0]]))
    assert repetition_penalty(scores, tokens, 1.0, real) is scores  # 1 changes nothing


def test_no_repeat_ngram_bans_the_token_that_would_repeat_an_ngram():
    tokens = torch.tensor([[5, 1, 2, 3, 1, 2], [1, 1, 1, 1, 1, 1]])
    real = torch.ones_like(tokens, dtype=torch.bool)
    banned = banned_ngram_tokens(tokens, 3, 6, real)
    # row 0 ends in (1, 2) and (1, 2, 3) occurred: 3 is banned; row 1: (1, 1, 1)
    assert banned[0].nonzero().flatten().tolist() == [3]
    assert banned[1].nonzero().flatten().tolist() == [1]
    assert not banned_ngram_tokens(tokens[:, :2], 3, 6, real[:, :2]).any()  # too short yet
    # an n-gram that runs through left padding does not count
    padded = torch.tensor([[1, 2, 3, 1, 2]])
    real_tail = torch.tensor([[False, False, True, True, True]])
    assert not banned_ngram_tokens(padded, 3, 6, real_tail).any()
    assert banned_ngram_tokens(padded, 3, 6, torch.ones_like(real_tail)).nonzero()[
        :, 1
    ].tolist() == [3]


def test_suppress_and_hold_back_eos_make_tokens_impossible():
    scores = torch.zeros(2, 4)
    assert torch.equal(suppress(scores, torch.tensor([1, 3])), torch.tensor([[0, INF, 0, INF]] * 2))
    held = hold_back_eos(scores, eos_id=2, generated=1, min_new_tokens=2)
    assert torch.equal(held, torch.tensor([[0, 0, INF, 0]] * 2))
    assert hold_back_eos(scores, 2, generated=2, min_new_tokens=2) is scores


@pytest.mark.parametrize("strategy", STRATEGIES, ids=["greedy", "sample", "beam"])
def test_no_repeat_ngram_size_2_never_emits_a_repeated_bigram(strategy: dict):
    model = TableLM(STUCK)
    prompt = torch.tensor([[0, 1], [2, 3]])
    out = decode(model, prompt, 10, strategy, controls=Controls(no_repeat_ngram_size=2))
    for row in out.tolist():
        bigrams = list(zip(row, row[1:]))
        assert len(bigrams) == len(set(bigrams)), row
    plain = generate(model, prompt, 10, temperature=0.0)
    assert plain[0, -3:].tolist() == [1, 1, 1]  # without it, the model repeats itself


@pytest.mark.parametrize("strategy", STRATEGIES, ids=["greedy", "sample", "beam"])
def test_a_suppressed_token_never_appears(strategy: dict):
    model = TableLM(STUCK)
    prompt = torch.tensor([[0], [4]])
    out = decode(model, prompt, 12, strategy, controls=Controls(suppress_tokens=(0, 4)))
    assert not (out[:, 1:] == 0).any() and not (out[:, 1:] == 4).any()


@pytest.mark.parametrize("strategy", STRATEGIES, ids=["greedy", "sample", "beam"])
def test_min_new_tokens_holds_eos_back_exactly_that_long(strategy: dict):
    # every token's most likely successor is eos (3)
    eager = [[0.0003, 0.0003, 0.0004, 0.999] for _ in range(4)]
    model = TableLM(eager)
    prompt = torch.tensor([[0]])
    common = dict(eos_id=3, stop_at_eos=True)
    early = decode(model, prompt, 8, strategy, **common)
    assert early[0].tolist()[:2] == [0, 3]
    held = decode(model, prompt, 8, strategy, controls=Controls(min_new_tokens=5), **common)
    new = held[0, 1:].tolist()
    assert 3 not in new[:5] and new[5] == 3  # eos the first time it may come


@pytest.mark.parametrize("strategy", STRATEGIES, ids=["greedy", "sample", "beam"])
def test_repetition_penalty_one_changes_nothing(strategy: dict):
    model = TableLM(STUCK)
    prompt = torch.tensor([[0, 1], [2, 3]])
    if "generator" in strategy:
        strategy = {**strategy, "generator": torch.Generator().manual_seed(0)}
    plain = decode(model, prompt, 8, strategy)
    if "generator" in strategy:
        strategy = {**strategy, "generator": torch.Generator().manual_seed(0)}
    same = decode(model, prompt, 8, strategy, controls=Controls(repetition_penalty=1.0))
    assert torch.equal(plain, same)
    # log-probabilities are negative: a penalty multiplies the seen token's (0.55) enough
    greedy_penalised = generate(
        model, prompt, 8, temperature=0.0, controls=Controls(repetition_penalty=5.0)
    )
    assert not torch.equal(greedy_penalised, generate(model, prompt, 8, temperature=0.0))


WORDS = Tokenizer(Vocabulary(["<eos>", "<unk>", "the", "company", "said", "."]))


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_a_stop_string_ends_the_text_before_it(strategy: str):
    # the -> company -> said -> . -> the ... all but certain
    chain = [[0.0002] * 6 for _ in range(6)]
    for here, there in {2: 3, 3: 4, 4: 5, 5: 2, 0: 2, 1: 2}.items():
        chain[here][there] = 0.999
    model = TableLM(chain)
    decoding = Decoding(strategy=strategy, num_beams=2, stop=("said .",))
    generator = torch.Generator().manual_seed(0)
    (continuation,) = continue_prompts(
        model, [[0, 2]], 9, decoding, vocab=WORDS, generator=generator
    )
    text = WORDS.decode(continuation[0])
    assert text.startswith("company said .")
    assert until_stop(text, decoding.stop) == "company"
    if strategy == "beam":  # beam search runs its course; the text is cut afterwards
        assert len(continuation[0]) == 9
    else:  # greedy and sampled rows end right after the stop string
        assert len(continuation[0]) == 3
    assert until_stop("a b", ("x",)) == "a b"


def test_early_stopping_and_num_return_sequences():
    from test_decoding import MYOPIC

    model = TableLM(MYOPIC)
    prompt = torch.tensor([[0]])
    best, scores = beam_search(model, prompt, 4, num_beams=3, num_return_sequences=3)
    assert best.shape == (3, 5) and scores.tolist() == sorted(scores.tolist(), reverse=True)
    single, score = beam_search(model, prompt, 4, num_beams=3)
    assert torch.equal(single[0], best[0]) and score[0] == scores[0]
    for early in (True, False, "never"):
        out, _ = beam_search(
            model, prompt, 6, num_beams=2, eos_id=3, stop_at_eos=True, early_stopping=early
        )
        assert out.size(0) == 1
    with pytest.raises(
        ValueError, match="num_return_sequences must be an integer from 1 to num_beams=2"
    ):
        beam_search(model, prompt, 4, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping must be true, false or never"):
        beam_search(model, prompt, 4, num_beams=2, early_stopping="sometimes")


@pytest.mark.parametrize(
    ("controls", "message"),
    [
        (Controls(repetition_penalty=0.0), r"repetition_penalty must be a number > 0, got 0.0"),
        (Controls(no_repeat_ngram_size=-1), r"no_repeat_ngram_size must be an integer >= 0"),
        (Controls(min_new_tokens=9), r"min_new_tokens=9 exceeds max_new_tokens=8"),
        (Controls(suppress_tokens=(99,)), r"suppress_tokens holds 99, not a token id"),
    ],
)
def test_bad_controls_raise_one_line(controls: Controls, message: str):
    with pytest.raises(ValueError, match=message):
        generate(TableLM(STUCK), torch.tensor([[0]]), 8, controls=controls)
