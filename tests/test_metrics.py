"""Word-level perplexity and bits per character: counted per target, equal to the text's counts."""

import math

import pytest
import torch

from lmlab.data import TokenBlocks
from lmlab.lit_module import LanguageModel
from lmlab.metrics import TextScores, UnitCounts
from lmlab.models.gpt import GPTConfig
from lmlab.streams import StreamWindows
from lmlab.tokenizers import TokenizerSpec

from conftest import quiet_trainer, random_batches

LINES = [
    " the company said <unk> N shares rose ",
    "",
    "",
    " = Valkyria Chronicles = ",
    " the market fell and the company said nothing ",
] * 7


def text_words(lines) -> int:
    """Words, and one <eos> per line, as PTB counts them."""
    return sum(len(line.split()) + 1 for line in lines)


def text_chars(lines) -> int:
    """Characters of each line's words joined by single spaces, and one newline per line."""
    return sum(len(" ".join(line.split())) + 1 for line in lines)


@pytest.mark.parametrize("kind, size", [("word", None), ("char", None), ("bpe", 70)])
def test_blocks_and_streams_count_the_words_and_characters_of_the_text(kind, size):
    tokenizer = TokenizerSpec(kind, size).train(LINES)
    counts = UnitCounts(tokenizer.units(), tokenizer.eos_id)
    tokens = torch.from_numpy(tokenizer.encode_lines(LINES))
    blocks = TokenBlocks(tokens, seq_len=7, pad_last=True)  # the last block padded
    assert counts(*blocks.all_blocks()) == (text_words(LINES), text_chars(LINES))
    windows = StreamWindows(tokens, streams=3, seq_len=5, pad_last=True)
    found = [counts(*windows[i]) for i in range(len(windows))]
    assert sum(w for w, _ in found) == text_words(LINES)
    assert sum(c for _, c in found) == text_chars(LINES)
    if kind == "char":  # one token per character
        assert len(tokens) == text_chars(LINES)


def test_scores_are_ratios_of_summed_nll_words_and_characters():
    scores = TextScores()
    scores.update(torch.tensor(10.0), 4, 20)
    scores.update(torch.tensor(6.0), 4, 12)  # sums, never a mean of two ratios
    word_ppl, bpc = scores.compute().tolist()
    assert word_ppl == pytest.approx(math.exp(16 / 8))
    assert bpc == pytest.approx(16 / math.log(2) / 32)


def test_a_word_model_logs_word_perplexity_equal_to_its_perplexity(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(28)]
    module = LanguageModel(config, words, optimizer=torch.optim.AdamW)
    trainer = quiet_trainer(tmp_path, [], accelerator="cpu", devices=1)
    (logged,) = trainer.validate(module, random_batches(3, 30, seed=1))
    assert logged["val/word_ppl"] == logged["val/ppl"]
    assert logged["val/bpc"] > 0
