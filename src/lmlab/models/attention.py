"""Causal self-attention written out for the CPU cases where SDPA's kernels are slow.

`F.scaled_dot_product_attention` picks a flash kernel on CPU. In float32 it is the
fastest, but in bf16 its backward is not: forward and backward of a batch of
32 x 4 heads x 64 positions x 64 dims take 15.0 ms with it, 6.3 ms with SDPA's
math backend and 2.4 ms written out as below (`python benchmarks/attention_speed.py`,
2026-12-03, Intel Xeon family 6 model 167 with AMX, 2 threads, torch 2.13; fp32 there:
4.8 ms SDPA, 6.6 ms written out). Measured on that one CPU: rerun the benchmark on
another before trusting the bf16 rule there.
With dropout, SDPA on CPU falls back to the same math but draws its mask with
`bernoulli_`; written out, the mask is the model's cheaper `Dropout`, and the
scale and the causal mask ride on the matmul: 1.7x faster.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def prefers_written_out(q: Tensor, dropout_p: float) -> bool:
    """Whether `causal_attention` beats SDPA for training on these queries."""
    return q.device.type == "cpu" and (dropout_p > 0 or q.dtype == torch.bfloat16)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, dropout: Callable[[Tensor], Tensor]
) -> Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask), `dropout` applied to it, times v.

    q, k, v are (B, nh, T, hd) (k and v already repeated for grouped heads); the
    result is (B, nh, T, hd), what SDPA with `is_causal=True` returns.
    """
    B, nh, T, hd = q.shape
    future = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
    # scores = future + q k^T / sqrt(hd), one op: (B * nh, T, T)
    scores = torch.baddbmm(
        future,
        q.reshape(B * nh, T, hd),
        k.reshape(B * nh, T, hd).transpose(1, 2),
        alpha=hd**-0.5,
    )
    weights = dropout(scores.softmax(dim=-1))
    return (weights @ v.reshape(B * nh, T, hd)).view(B, nh, T, hd)
