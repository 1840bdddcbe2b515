"""`Perplexity`: exp of the mean negative log-likelihood over every scored token of a split.

The one perplexity metric: `LanguageModel` (val/ and test/) and `eval.py` both
feed it the summed NLL and the token count of each batch, as the fused loss
returns them (`linear_cross_entropy(..., reduction="sum")`), so no (B, T,
vocab) logits are ever materialised to score a split.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


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
