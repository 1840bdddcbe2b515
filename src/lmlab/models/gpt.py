"""`gpt`: a decoder-only Transformer language model (GPT-2's block) in plain PyTorch.

Read top to bottom: the config, attention, MLP, block, then the model. No
Lightning and no Hydra here; training and decoding wrap this module through the
interface every family shares (`lmlab.models.interface`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmlab.loss import output_layer
from lmlab.models.attention import causal_attention, prefers_written_out
from lmlab.models.dropout import Dropout
from lmlab.models.interface import check_family, check_fractions, check_positive_ints
from lmlab.models.kv_cache import KVCache, positions, visible
from lmlab.onednn import Linear, step_mm  # nn.Linear and a step's matmul, oneDNN where faster
from lmlab.tied_gradient import TiedGradient, lookup, tied_gradient


@dataclass
class GPTConfig:
    """Every number that defines the network; flat, so it travels as plain JSON."""

    family: str = "gpt"
    vocab_size: int = 10_000
    block_size: int = 64  # longest context the positional table covers
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.1
    # Dropout on the attention weights; None: the same as `dropout` (nanoGPT's one knob).
    attn_dropout: float | None = None
    bias: bool = True
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        check_family(self, "gpt")
        check_positive_ints(
            self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio")
        )
        check_fractions(self, ("dropout", "attn_dropout"))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        self.head_dim = self.n_embd // self.n_head

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    def to_dict(self) -> dict[str, int | float | bool | str | None]:
        """The constructor arguments, as plain values (derived fields left out)."""
        values = asdict(self)
        del values["head_dim"]
        return values


PRESETS: dict[str, dict[str, int | float]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, dropout=0.0),
    "small": dict(n_layer=2, n_head=4, n_embd=256, dropout=0.2, attn_dropout=0.0),
    "medium": dict(n_layer=6, n_head=8, n_embd=512, dropout=0.3),
    "large": dict(n_layer=12, n_head=12, n_embd=768, dropout=0.3),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        # Applied by this module on CPU and by SDPA elsewhere (see forward).
        self.attn_dropout = Dropout(config.attention_dropout)
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, offset: Tensor | None = None
    ) -> Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, nh, T, hd); split rather than permuted, so that
        # backward writes their gradients into one (B, T, 3C) tensor in one pass.
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=2)
        )
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if cache is None and offset is None and prefers_written_out(q, dropout_p):
            y = causal_attention(q, k, v, self.attn_dropout)
        elif cache is None and offset is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            start = 0
            if cache is not None:
                start = cache.length
                k, v = cache.update(self.layer, k, v)  # (B, nh, start + T, hd)
            if T == 1 and offset is None:  # one new query sees every cached position
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:  # query i sits at position start + i and sees positions <= start + i
                mask = visible(start, T, offset, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc = Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # Exact GELU: on CPU its kernel is 5x faster than the tanh approximation's.
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_mlp = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, offset: Tensor | None = None
    ) -> Tensor:
        x = x + self.attn(self.ln_attn(x), cache, offset)
        return x + self.mlp(self.ln_mlp(x))


class GPTLM(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def max_context(self) -> int:
        """The positional table covers `block_size` positions: no state may hold more."""
        return self.config.block_size

    carries_state = False  # each training window starts afresh (no memory across windows)
    needs_native_bf16 = False  # emulated bf16 is slow, but every kernel has it
    compiles = True  # torch.compile makes one graph of a training step (tests/test_compile.py)

    def new_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for `max_len` positions (default and at most `block_size`)."""
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ValueError(
                f"a KV cache of {max_len} positions exceeds the model's "
                f"block_size of {self.config.block_size}"
            )
        c = self.config
        weight = self.token_embedding.weight
        return KVCache(
            c.n_layer,
            batch_size,
            c.n_head,
            c.head_dim,
            max_len,
            device=device or weight.device,
            dtype=dtype or weight.dtype,
        )

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        state: KVCache | None = None,
        reduction: str = "mean",
        pad_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, the loss instead.

        With a `state` (a KV cache), `idx` continues the sequence it holds: its
        positions start at `state.length`, and the cache advances by T.
        `pad_mask` (B, T), True at padding: prompts of different lengths
        left-padded into one batch. Padding is never attended to, and each row's
        positions count from its first real token, so a row's logits are those
        of its prompt alone (the padding positions' own logits mean nothing). With
        a state, padding may only lead the first forward (the prefill). With
        `targets` (B, T), it returns their mean cross-entropy (positions whose
        target is -100 do not count), or with `reduction="sum"` the summed NLL
        and the number of counted targets, fused with the output layer so that
        the logits are never materialised (see lmlab/loss.py).
        """
        start, offset = self._positions_of(idx, state, pad_mask)
        if state is not None and idx.size(1) == 1 and not self.training and targets is None:
            return self._decode_one(idx, state)
        weight = self.token_embedding.weight
        tied = tied_gradient(weight, self.lm_head.weight, targets)
        hidden = self._hidden(idx, state, start, offset, tied)
        return self.output(hidden, targets, reduction, tied)

    def hidden_states(
        self, idx: Tensor, state: KVCache | None = None, pad_mask: Tensor | None = None
    ) -> Tensor:
        """The final hidden states (B, T, n_embd), what the output layer reads: `forward`
        without the output layer, the same `state` (advanced the same way) and `pad_mask`."""
        return self._hidden(idx, state, *self._positions_of(idx, state, pad_mask))

    def _positions_of(
        self, idx: Tensor, cache: KVCache | None, pad_mask: Tensor | None
    ) -> tuple[int, Tensor | None]:
        """Where `idx` starts, and each row's leading padding (None: none)."""
        T = idx.size(1)
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
            )
        if cache is not None:
            return start, cache.start_rows(pad_mask)
        return start, None if pad_mask is None else pad_mask.sum(1)

    def _hidden(
        self,
        idx: Tensor,
        cache: KVCache | None,
        start: int,
        offset: Tensor | None,
        tied: TiedGradient | None = None,
    ) -> Tensor:
        where = positions(start, idx.size(1), offset, idx.device)  # (T,), or (B, T) if padded
        tokens = lookup(idx, self.token_embedding.weight, tied)
        x = self.dropout(tokens + self.position_embedding(where))
        for block in self.blocks:
            x = block(x, cache, offset)  # (B, T, C)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.ln_final(x)

    def output(
        self,
        hidden: Tensor,
        targets: Tensor | None = None,
        reduction: str = "mean",
        tied: TiedGradient | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The output layer on `hidden_states`: logits (B, T, vocab), or `forward`'s loss
        (`tied`: the carrier `forward` shares with its lookup, lmlab.tied_gradient)."""
        return output_layer(self.lm_head, hidden, targets, reduction, tied)

    def _decode_one(self, idx: Tensor, cache: KVCache) -> Tensor:
        """`forward` for one new position per row in eval mode, same math, same result.

        Decoding calls this once per token. At batch 1 a step is ~0.6 ms, and the
        ~25 `nn.Module` calls of `forward` add ~0.06 ms of Python on top, so this
        path calls the functional ops on the same parameters directly (dropout is
        off in eval mode), its matrices read in the layout of `_step_weights`.
        tests/test_families.py checks it equals the module path to float32 rounding.
        """
        B, C, pos = idx.size(0), self.config.n_embd, cache.length
        nh, hd = self.config.n_head, self.config.head_dim
        if pos >= cache.max_len:
            raise ValueError(f"KV cache overflow: {pos + 1} positions > {cache.max_len}")
        offset = cache.offset
        if cache.static:  # the position read on the device, the whole buffer attended to
            where = cache.position.expand(B) if offset is None else cache.position - offset
            mask = cache.step_mask()  # (1, max_len), or (B, 1, 1, max_len) if padded
        else:
            where = pos if offset is None else pos - offset  # a row's own position
            # every cached slot, or each row's real ones: (B, 1, 1, pos + 1)
            mask = None if offset is None else visible(pos, 1, offset, idx.device)
        if cache.step_weights is None:  # the cache's first one-token step
            cache.step_weights = self._step_weights()
        layers, head = cache.step_weights
        x = self.token_embedding.weight[idx[:, 0]] + self.position_embedding.weight[where]
        for i, (block, (qkv_t, proj_t, fc_t, fc_proj_t)) in enumerate(zip(self.blocks, layers)):
            attn, mlp = block.attn, block.mlp
            h = F.layer_norm(x, (C,), block.ln_attn.weight, block.ln_attn.bias)
            qkv = _affine(h, qkv_t, attn.qkv.bias).view(B, 3, nh, hd)
            if cache.static:
                k, v = cache.write_step(i, qkv[:, 1, :, None], qkv[:, 2, :, None])
            else:
                cache.keys[i, :, :, pos] = qkv[:, 1]
                cache.values[i, :, :, pos] = qkv[:, 2]
                k, v = cache.keys[i, :, :, : pos + 1], cache.values[i, :, :, : pos + 1]
            y = F.scaled_dot_product_attention(qkv[:, 0, :, None], k, v, attn_mask=mask)
            x = x + _affine(y.view(B, C), proj_t, attn.proj.bias)
            h = F.layer_norm(x, (C,), block.ln_mlp.weight, block.ln_mlp.bias)
            h = F.gelu(_affine(h, fc_t, mlp.fc.bias))
            x = x + _affine(h, fc_proj_t, mlp.proj.bias)
        cache.advance(1)
        x = F.layer_norm(x, (C,), self.ln_final.weight, self.ln_final.bias)
        return step_mm(x, head, head=True)[:, None]  # (B, 1, vocab)

    def _step_weights(self, copies: bool | None = None) -> tuple[list[tuple[Tensor, ...]], Tensor]:
        """The one-token step's matrices as (in, out): per layer qkv, proj, fc and the MLP's
        proj, then the output layer.

        On CPU these are transposed copies, made once per KV cache (that is, per decoding
        call): a one-row matmul reads a contiguous (in, out) matrix faster than
        `nn.Linear`'s (out, in) one. `benchmarks/generate_speed.py --cache-only --layouts`
        (AMD EPYC family 26, torch 2.13, 2 threads, 2026-12-05), copies over views: greedy
        1.25x at batch 1 and 1.24x at batch 8, beam search of 4 beams 1.17x and 0.98x.
        They cost one more copy of the weights while a cache lives.
        Elsewhere they are views, which cuBLAS reads in either layout. `copies` overrides
        the choice (`benchmarks/generate_speed.py --layouts` times both on one machine).
        """
        if copies is None:
            copies = self.lm_head.weight.device.type == "cpu"

        def laid_out(weight: Tensor) -> Tensor:
            weight = weight.detach().t()
            return weight.contiguous() if copies else weight

        layers = [
            tuple(
                laid_out(linear.weight)
                for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj)
            )
            for block in self.blocks
        ]
        return layers, laid_out(self.lm_head.weight)


def _affine(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight_t.T, bias)` for a weight given as (in, out)."""
    return step_mm(x, weight_t, bias)
