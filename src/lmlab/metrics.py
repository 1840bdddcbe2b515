"""`Perplexity`: exp of the mean negative log-likelihood over every scored token of a split;
`TextScores`: the same NLL per word and per character, comparable across tokenizers.

The one perplexity metric: `LanguageModel` (val/ and test/) and `eval.py` both
feed it the summed NLL and the token count of each batch, as the fused loss
returns them (`linear_cross_entropy(..., reduction="sum")`), so no (B, T,
vocab) logits are ever materialised to score a split.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lmlab.loss import IGNORE_INDEX
from lmlab.tokenizers import Units


class Perplexity(Metric):
    """exp(total NLL / total tokens) over every batch seen, on every process.

    The sums are reduced across processes, so the result is the perplexity of
    the whole split. The NLL accumulates in float64: a split of a million
    tokens summed in float32 would lose the sixth digit.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, count: Tensor | int) -> None:
        """Add a batch: its summed NLL and how many tokens it scored."""
        self.nll += nll_sum.detach().double()
        self.count += count

    def compute(self) -> Tensor:
        return torch.exp(self.nll / self.count).float()


class UnitCounts:
    """How many words and characters of the text a batch's targets stand for.

    From a tokenizer's `units()` (lmlab.tokenizers.Units): a lookup per target
    id, except that an `<eos>` right after another token counts as
    `eos_after_token`. Padding targets (IGNORE_INDEX) count nothing.
    """

    def __init__(self, units: Units, eos_id: int) -> None:
        self.words = torch.tensor(units.words, dtype=torch.long)
        self.chars = torch.tensor(units.chars, dtype=torch.long)
        self.eos_after_token = units.eos_after_token
        self.eos_id = eos_id

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(words, characters) of `targets` (B, T), whose previous tokens are `inputs` (B, T)."""
        if self.words.device != targets.device:
            self.words, self.chars = self.words.to(targets.device), self.chars.to(targets.device)
        real = targets != IGNORE_INDEX
        ids = targets.clamp(min=0)
        after = (ids == self.eos_id) & (inputs != self.eos_id)
        words = torch.where(after, self.eos_after_token[0], self.words[ids])
        chars = torch.where(after, self.eos_after_token[1], self.chars[ids])
        return (words * real).sum(), (chars * real).sum()


class TextScores(Metric):
    """Word-level perplexity and bits per character over every batch seen, on every process.

    exp(total NLL / words) and total NLL in bits / characters, with words and
    characters as `UnitCounts` counts them, so models with different
    tokenizers compare on the same text. Sums are reduced across processes
    (never averages of per-process ratios), so the result is the whole split's.
    For a word tokenizer every target is one word: word perplexity is `Perplexity`.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("words", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("chars", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, words: Tensor | int, chars: Tensor | int) -> None:
        self.nll += nll_sum.detach().double()
        self.words += words
        self.chars += chars

    def compute(self) -> Tensor:
        """(word-level perplexity, bits per character), float32."""
        word_ppl = torch.exp(self.nll / self.words)
        bpc = self.nll / math.log(2) / self.chars
        return torch.stack([word_ppl, bpc]).float()
