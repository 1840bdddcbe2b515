"""`llama`: a Llama-style decoder-only Transformer in plain PyTorch.

What differs from `gpt`: RMSNorm instead of LayerNorm, rotary position
embeddings (RoPE: no learned position table, so a decoding state may hold more
positions than the training window), a SwiGLU MLP, no biases, grouped-query
attention (`n_kv_head` key/value heads shared by `n_head` query heads) and an
optional untied output layer. The rotation and the weight layout follow Hugging
Face's `LlamaForCausalLM` (rotate-half RoPE, `w_gate`/`w_up`/`w_down` MLP), so a
model maps onto it weight for weight.

Read top to bottom: the config, RoPE, attention, MLP, block, then the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmlab.checks import is_real
from lmlab.loss import output_layer
from lmlab.models.attention import causal_attention, prefers_written_out
from lmlab.models.dropout import Dropout
from lmlab.models.interface import check_family, check_fractions, check_positive_ints
from lmlab.models.kv_cache import KVCache, positions, visible
from lmlab.onednn import Linear, step_mm  # nn.Linear and a step's matmul, oneDNN where faster
from lmlab.tied_gradient import TiedGradient, lookup, tied_gradient


@dataclass
class LlamaConfig:
    """Every number that defines the network; flat, so it travels as plain JSON."""

    family: str = "llama"
    vocab_size: int = 10_000
    block_size: int = 64  # the training window; decoding may go past it (RoPE)
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads; None: n_head (no grouping)
    n_embd: int = 256
    mlp_hidden: int | None = None  # SwiGLU width; None: 8/3 n_embd, rounded up to 32
    dropout: float = 0.1
    attn_dropout: float = 0.0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int = field(init=False)
    kv_heads: int = field(init=False)
    hidden: int = field(init=False)

    def __post_init__(self) -> None:
        check_family(self, "llama")
        check_positive_ints(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        check_fractions(self, ("dropout", "attn_dropout"))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        self.kv_heads = self.n_head if self.n_kv_head is None else self.n_kv_head
        check_positive_ints(self, ("kv_heads",) if self.n_kv_head is None else ("n_kv_head",))
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"model.n_kv_head ({self.kv_heads}) must divide model.n_head ({self.n_head}): "
                "each key/value head serves the same number of query heads"
            )
        self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ValueError(
                f"model.n_embd / model.n_head ({self.head_dim}) must be even for rotary embeddings"
            )
        if self.mlp_hidden is not None:
            check_positive_ints(self, ("mlp_hidden",))
        self.hidden = self.mlp_hidden or 32 * math.ceil(8 * self.n_embd / 3 / 32)
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (is_real(value) and value > 0):
                raise ValueError(f"model.{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"model.tie_embeddings must be true or false, got {self.tie_embeddings!r}"
            )

    def to_dict(self) -> dict[str, int | float | bool | str | None]:
        """The constructor arguments, as plain values (derived fields left out)."""
        values = asdict(self)
        for derived in ("head_dim", "kv_heads", "hidden"):
            del values[derived]
        return values


PRESETS: dict[str, dict[str, int | float | None]] = {
    "llama_tiny": dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, dropout=0.0),
    "llama_small": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=256, dropout=0.2),
}


def rope_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation at each position, as Hugging Face's Llama computes them.

    (T, head_dim) for positions (T,); (B, 1, T, head_dim) for per-row positions (B, T).
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    freqs = positions.float()[..., None] * inv_freq  # (..., T, head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (..., T, head_dim)
    if angles.dim() == 3:
        angles = angles[:, None]  # one table per row, shared by its heads
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on (B, heads, T, head_dim): each half-pair of dimensions turned by its angle."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated_half * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query key/value heads."""

    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.theta = config.rope_theta
        self.q = Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.k = Linear(config.n_embd, config.kv_heads * config.head_dim, bias=False)
        self.v = Linear(config.n_embd, config.kv_heads * config.head_dim, bias=False)
        self.proj = Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        self.attn_dropout = config.attn_dropout
        self.weights_dropout = Dropout(config.attn_dropout)  # when written out on CPU
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, offset: Tensor | None
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        dropout_p = self.attn_dropout if self.training else 0.0
        grouped = self.kv_heads != self.n_head
        if cache is None and offset is None and prefers_written_out(q, dropout_p):
            repeat = self.n_head // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            y = causal_attention(q, k, v, self.weights_dropout)
        elif cache is None and offset is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=grouped
            )
        else:
            if cache is not None and cache.static and T == 1:  # static shapes: whole buffer
                k, v = cache.write_step(self.layer, k, v)  # (B, nkv, max_len, hd)
                mask = cache.step_mask()
            else:
                start = 0
                if cache is not None:
                    start = cache.length
                    k, v = cache.update(self.layer, k, v)  # (B, nkv, start + T, hd)
                # query i sits at position start + i and sees positions <= start + i
                mask = visible(start, T, offset, x.device)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=grouped
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate = Linear(config.n_embd, config.hidden, bias=False)
        self.up = Linear(config.n_embd, config.hidden, bias=False)
        self.down = Linear(config.hidden, config.n_embd, bias=False)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """Pre-RMSNorm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.norm_attn = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config, layer)
        self.norm_mlp = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, offset: Tensor | None
    ) -> Tensor:
        x = x + self.attn(self.norm_attn(x), cos, sin, cache, offset)
        return x + self.mlp(self.norm_mlp(x))


class LlamaLM(nn.Module):
    carries_state = False  # each training window starts afresh (no memory across windows)
    needs_native_bf16 = False  # emulated bf16 is slow, but every kernel has it
    compiles = True  # torch.compile makes one graph of a training step (tests/test_compile.py)
    max_context = None  # rotary positions have no table: no limit (a KV cache has a size)

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_final = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # As in GPT-2: the residual projections scaled by 1/sqrt(2 * n_layer).
        for block in self.blocks:
            for linear in (block.attn.proj, block.mlp.down):
                nn.init.normal_(linear.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def new_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache of `max_len` positions (default `block_size`), `n_kv_head` heads."""
        c = self.config
        weight = self.token_embedding.weight
        return KVCache(
            c.n_layer,
            batch_size,
            c.kv_heads,
            c.head_dim,
            max_len or c.block_size,
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
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, the fused loss.

        With a `state` (a KV cache), `idx` continues the sequence it holds at
        positions `state.length` onwards, and the cache advances by T.
        `pad_mask` (B, T), True at left padding, as in `gpt`: never attended to,
        each row's positions counted from its first real token.
        """
        if state is not None and idx.size(1) == 1 and not self.training and targets is None:
            state.start_rows(pad_mask)
            return self._decode_one(idx, state)
        weight = self.token_embedding.weight
        tied = tied_gradient(weight, self.lm_head.weight, targets)
        hidden = self._hidden(idx, state, pad_mask, tied)
        return self.output(hidden, targets, reduction, tied)

    def hidden_states(
        self, idx: Tensor, state: KVCache | None = None, pad_mask: Tensor | None = None
    ) -> Tensor:
        """The final hidden states (B, T, n_embd), what the output layer reads: `forward`
        without the output layer, the same `state` (advanced the same way) and `pad_mask`."""
        return self._hidden(idx, state, pad_mask)

    def _hidden(
        self,
        idx: Tensor,
        state: KVCache | None,
        pad_mask: Tensor | None,
        tied: TiedGradient | None = None,
    ) -> Tensor:
        B, T = idx.shape
        start = 0 if state is None else state.length
        offset = pad_mask.sum(1) if state is None and pad_mask is not None else None
        if state is not None:
            offset = state.start_rows(pad_mask)
        if state is not None and state.static and T == 1:  # read on the device, for a graph
            where = state.position.view(1) if offset is None else (state.position - offset)[:, None]
        else:
            where = positions(start, T, offset, idx.device)
        cos, sin = rope_tables(self.config.head_dim, where, self.config.rope_theta)
        x = self.dropout(lookup(idx, self.token_embedding.weight, tied))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, state, offset)
        if state is not None:
            state.advance(T)
        return self.norm_final(x)

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

        As `gpt`'s: the functional ops on the step's matrices (`_step_weights`), no
        `nn.Module` calls (dropout is off in eval mode), the rotation read from a table
        made once per cache. tests/test_families.py checks it equals the module path to float32
        rounding (plain, static and left-padded caches).
        """
        B, c = idx.size(0), self.config
        nh, nkv, hd, C = c.n_head, c.kv_heads, c.head_dim, c.n_embd
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache overflow: {cache.length + 1} positions > {cache.max_len}")
        offset = cache.offset
        if cache.static:  # the position read on the device, the whole buffer attended to
            where = cache.position if offset is None else cache.position - offset
            mask = cache.step_mask()
        else:  # a row's own position; every cached slot, or each row's real ones
            where = cache.length if offset is None else cache.length - offset
            mask = None if offset is None else visible(cache.length, 1, offset, idx.device)
        if cache.step_weights is None:  # the cache's first one-token step
            cache.step_weights = self._step_weights(cache.max_len)
        layers, head, tables = cache.step_weights
        # (1, hd) for every row alike, (B, 1, 1, hd) per row: broadcast over the heads
        shape = (1, hd) if offset is None else (B, 1, 1, hd)
        cos, sin = (table[where].view(shape) for table in tables)
        x = self.token_embedding.weight[idx[:, 0]]  # (B, C)
        for i, (block, (qkv_t, proj_t, gate_up_t, down_t)) in enumerate(zip(self.blocks, layers)):
            h = F.rms_norm(x, (C,), block.norm_attn.weight, block.norm_attn.eps)
            q, k, v = step_mm(h, qkv_t).split((nh * hd, nkv * hd, nkv * hd), dim=1)
            q = rotate(q.view(B, nh, 1, hd), cos, sin)
            k = rotate(k.view(B, nkv, 1, hd), cos, sin)
            v = v.view(B, nkv, 1, hd)
            if cache.static:
                k, v = cache.write_step(i, k, v)
            else:
                k, v = cache.update(i, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
            x = x + step_mm(y.view(B, nh * hd), proj_t)
            h = F.rms_norm(x, (C,), block.norm_mlp.weight, block.norm_mlp.eps)
            gate, up = step_mm(h, gate_up_t).chunk(2, dim=1)
            x = x + step_mm(F.silu(gate) * up, down_t)
        cache.advance(1)
        x = F.rms_norm(x, (C,), self.norm_final.weight, self.norm_final.eps)
        return step_mm(x, head, head=True)[:, None]  # (B, 1, vocab)

    def _step_weights(
        self, max_len: int
    ) -> tuple[list[tuple[Tensor, ...]], Tensor, tuple[Tensor, Tensor]]:
        """The one-token step's matrices as (in, out): per layer q, k and v side by side, the
        attention's output, gate and up side by side, down; the output layer; and the
        rotation's cos and sin for positions 0 to max_len - 1.

        Made once per KV cache (that is, per decoding call), as `gpt`'s: one matmul for q, k,
        v and one for gate and up instead of three and two, each reading a contiguous (in,
        out) matrix; they cost one more copy of the block weights while a cache lives. The
        output layer is a transposed copy on CPU and a view elsewhere, as in `gpt`.
        """

        def laid_out(*linears: nn.Linear) -> Tensor:
            return torch.cat([linear.weight.detach().t() for linear in linears], dim=1)

        layers = [
            (
                laid_out(block.attn.q, block.attn.k, block.attn.v),
                laid_out(block.attn.proj),
                laid_out(block.mlp.gate, block.mlp.up),
                laid_out(block.mlp.down),
            )
            for block in self.blocks
        ]
        head = self.lm_head.weight.detach().t()
        if head.device.type == "cpu":
            head = head.contiguous()
        device = head.device
        tables = rope_tables(
            self.config.head_dim, torch.arange(max_len, device=device), self.config.rope_theta
        )
        return layers, head, tables
