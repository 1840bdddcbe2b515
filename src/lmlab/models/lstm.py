"""`lstm`: a multi-layer LSTM language model with the AWD-LSTM regularisers, in plain PyTorch.

The PTB baselines the literature is written in: Zaremba et al. 2014 (no dropout
or dropout between layers) and AWD-LSTM (Merity et al. 2018), whose
regularisers are all here:

- embedding dropout (`dropout_embedding`, AWD's dropoute): whole words dropped;
- locked (variational) dropout, one mask per sequence, on the embeddings
  (`dropout_input`, dropouti), between layers (`dropout_hidden`, dropouth) and
  on the output (`dropout`);
- weight-dropped hidden-to-hidden matrices (`weight_drop`, wdrop): DropConnect
  on each layer's `weight_hh`, a new mask per forward pass;
- tied input and output embeddings (`tie_weights`; the last layer then outputs
  `n_embd` units).

Each layer is an `nn.LSTM` (PyTorch's fused kernel); the weight drop swaps a
dropped copy of `weight_hh_l0` in through `torch.func.functional_call`. The
decoding state, `LSTMState`, is every layer's hidden and cell state; training in
the contiguous data order carries it from one window to the next, detached
(truncated backpropagation through time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from lmlab.checks import is_real
from lmlab.loss import output_layer
from lmlab.models.dropout import LockedDropout, embedding_dropout
from lmlab.models.interface import check_family, check_fractions, check_positive_ints
from lmlab.onednn import Linear  # nn.Linear, its float32 products through oneDNN where faster


@dataclass
class LSTMConfig:
    """Every number that defines the network; flat, so it travels as plain JSON."""

    family: str = "lstm"
    vocab_size: int = 10_000
    block_size: int = 20  # the training window (truncated BPTT length); not a limit
    n_layer: int = 2
    n_embd: int = 200  # embedding width (and the last layer's width when tied)
    n_hidden: int = 200  # the other layers' width
    dropout: float = 0.0  # locked dropout on the last layer's output
    dropout_hidden: float = 0.0  # locked dropout between layers
    dropout_input: float = 0.0  # locked dropout on the embeddings
    dropout_embedding: float = 0.0  # whole words of the embedding table
    weight_drop: float = 0.0  # DropConnect on each layer's hidden-to-hidden weights
    tie_weights: bool = True
    init_range: float = 0.1  # embedding and output weights uniform in +-init_range
    # The LSTM weights uniform in +-lstm_init_range (Zaremba: 0.1); None: PyTorch's
    # default, +-1/sqrt(width) (AWD-LSTM).
    lstm_init_range: float | None = None

    def __post_init__(self) -> None:
        check_family(self, "lstm")
        check_positive_ints(self, ("vocab_size", "block_size", "n_layer", "n_embd", "n_hidden"))
        check_fractions(
            self,
            ("dropout", "dropout_hidden", "dropout_input", "dropout_embedding", "weight_drop"),
        )
        if not isinstance(self.tie_weights, bool):
            raise ValueError(f"model.tie_weights must be true or false, got {self.tie_weights!r}")
        for name in ("init_range", "lstm_init_range"):
            value = getattr(self, name)
            if value is not None and not (is_real(value) and value > 0):
                raise ValueError(f"model.{name} must be a positive number, got {value!r}")

    def widths(self) -> list[int]:
        """Each layer's output width."""
        last = self.n_embd if self.tie_weights else self.n_hidden
        return [self.n_hidden] * (self.n_layer - 1) + [last]

    def to_dict(self) -> dict[str, int | float | bool | str | None]:
        return asdict(self)


PRESETS: dict[str, dict[str, int | float | bool | None]] = {
    "lstm_tiny": dict(n_layer=2, n_embd=32, n_hidden=32),
    # Zaremba et al.'s small LSTM; AWD-LSTM-style regularisation for CPU budgets.
    "lstm_small": dict(
        n_layer=2,
        n_embd=200,
        n_hidden=200,
        dropout=0.4,
        dropout_hidden=0.25,
        dropout_input=0.4,
        dropout_embedding=0.1,
        weight_drop=0.3,
    ),
}


class LSTMState:
    """Every layer's hidden and cell state, (1, B, width) each: what the model has read so far."""

    def __init__(self, hidden: list[tuple[Tensor, Tensor]]) -> None:
        self.hidden = hidden
        self.length = 0  # tokens read (the decoding loop counts positions)

    @property
    def batch_size(self) -> int:
        return self.hidden[0][0].size(1)

    capacity = None  # a recurrent state reads any length

    def advance(self, steps: int, hidden: list[tuple[Tensor, Tensor]]) -> None:
        self.hidden = hidden
        self.length += steps

    def reorder(self, index: Tensor, keep: int = 0) -> None:
        """Keep batch rows `index` (in that order); the whole state moves (`keep` is moot)."""
        self.hidden = [(h.index_select(1, index), c.index_select(1, index)) for h, c in self.hidden]

    def reset(self) -> None:
        self.hidden = [(torch.zeros_like(h), torch.zeros_like(c)) for h, c in self.hidden]
        self.length = 0

    def detach(self) -> None:
        self.hidden = [(h.detach(), c.detach()) for h, c in self.hidden]

    def state_dict(self) -> dict[str, Tensor]:
        values = {}
        for i, (h, c) in enumerate(self.hidden):
            values[f"h{i}"], values[f"c{i}"] = h.detach(), c.detach()
        return values

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.hidden = [
            (state[f"h{i}"].to(h), state[f"c{i}"].to(c)) for i, (h, c) in enumerate(self.hidden)
        ]


class LSTMLM(nn.Module):
    carries_state = True  # contiguous training hands each window's final state to the next
    max_context = None  # a recurrent state holds any length
    needs_native_bf16 = True  # oneDNN's LSTM has no bf16 kernel without AVX-512 BF16 or AMX
    compiles = False  # dynamo leaves nn.LSTM's fused kernel to eager: compile=auto skips it

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        inputs = [config.n_embd, *config.widths()[:-1]]
        self.layers = nn.ModuleList(
            nn.LSTM(width_in, width_out, batch_first=True)
            for width_in, width_out in zip(inputs, config.widths(), strict=True)
        )
        self.dropout_input = LockedDropout(config.dropout_input)
        self.dropout_hidden = LockedDropout(config.dropout_hidden)
        self.dropout = LockedDropout(config.dropout)
        self.lm_head = Linear(config.widths()[-1], config.vocab_size)
        if config.tie_weights:
            self.lm_head.weight = self.token_embedding.weight
        nn.init.uniform_(self.token_embedding.weight, -config.init_range, config.init_range)
        nn.init.uniform_(self.lm_head.weight, -config.init_range, config.init_range)
        nn.init.zeros_(self.lm_head.bias)
        if config.lstm_init_range is not None:
            for layer in self.layers:
                for weight in layer.parameters():
                    nn.init.uniform_(weight, -config.lstm_init_range, config.lstm_init_range)

    def new_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LSTMState:
        """Zero hidden and cell states; `max_len` does not matter to a recurrent state."""
        weight = self.token_embedding.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        return LSTMState(
            [
                (
                    torch.zeros(1, batch_size, width, device=device, dtype=dtype),
                    torch.zeros(1, batch_size, width, device=device, dtype=dtype),
                )
                for width in self.config.widths()
            ]
        )

    def _layer(self, index: int, x: Tensor, hidden: tuple[Tensor, Tensor] | None):
        layer = self.layers[index]
        p = self.config.weight_drop
        if not self.training or p == 0.0:
            return layer(x, hidden)
        # DropConnect on the recurrent weights, one mask per forward (AWD-LSTM's WeightDrop).
        dropped = {"weight_hh_l0": F.dropout(layer.weight_hh_l0, p, training=True)}
        return functional_call(layer, dropped, (x, hidden), strict=False)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        state: LSTMState | None = None,
        reduction: str = "mean",
        pad_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, the fused loss.

        With a `state`, the layers start from its hidden and cell states, and it
        holds their final ones afterwards (still attached to the graph: training
        detaches it between windows). `pad_mask` (B, T), True at left padding
        (prompts of different lengths in one batch, when decoding): each row is
        read from its first real token, as packed sequences, so its state and
        logits are those of its prompt alone.
        """
        return self.output(self.hidden_states(idx, state, pad_mask), targets, reduction)

    def hidden_states(
        self, idx: Tensor, state: LSTMState | None = None, pad_mask: Tensor | None = None
    ) -> Tensor:
        """The final hidden states (B, T, width), what the output layer reads (after the output
        dropout): `forward` without the output layer, the same `state` and `pad_mask`."""
        if pad_mask is not None and bool(pad_mask.any()):
            return self._padded_hidden_states(idx, pad_mask, state)
        c = self.config
        x = embedding_dropout(self.token_embedding, idx, c.dropout_embedding, self.training)
        x = self.dropout_input(x)  # (B, T, n_embd)
        final = []
        for i in range(c.n_layer):
            hidden = None if state is None else state.hidden[i]
            x, last = self._layer(i, x, hidden)  # (B, T, width)
            final.append(last)
            if i < c.n_layer - 1:
                x = self.dropout_hidden(x)
        if state is not None:
            state.advance(idx.size(1), final)
        return self.dropout(x)

    def output(
        self, hidden: Tensor, targets: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The output layer on `hidden_states`: logits (B, T, vocab), or `forward`'s loss."""
        return output_layer(self.lm_head, hidden, targets, reduction)

    def _padded_hidden_states(
        self, idx: Tensor, pad_mask: Tensor, state: LSTMState | None
    ) -> Tensor:
        """Hidden states of left-padded prompts, each row read alone (a packed sequence), in eval mode."""
        if self.training or (state is not None and state.length > 0):
            raise ValueError("padding is for decoding: only the first forward of a state in eval")
        B, T = idx.shape
        offset = pad_mask.sum(1)  # leading padding per row
        steps = torch.arange(T, device=idx.device)[None]
        # right-aligned: row b's real tokens first, then padding (what packing expects)
        right = idx.gather(1, (steps + offset[:, None]).clamp(max=T - 1))
        x = nn.utils.rnn.pack_padded_sequence(
            self.token_embedding(right), (T - offset).cpu(), batch_first=True, enforce_sorted=False
        )
        final = []
        for i, layer in enumerate(self.layers):
            x, last = layer(x, None if state is None else state.hidden[i])
            final.append(last)
        out, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=T)
        # back to the left-padded layout; the padding positions' outputs are zeros
        left = out.gather(1, (steps - offset[:, None]).clamp(min=0)[..., None].expand_as(out))
        left = left.masked_fill(pad_mask[..., None], 0.0)
        if state is not None:
            state.advance(T, final)
        return left
