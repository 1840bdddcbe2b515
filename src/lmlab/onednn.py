"""Float32 matmuls through oneDNN on the CPUs where torch's default BLAS runs them at half speed.

torch runs a float32 `torch.mm` on an x86 CPU through MKL, and MKL takes its AVX2
kernels on a CPU that is not Intel's, AVX-512 or not. oneDNN, the other CPU library
torch ships (its LSTM, convolution and bf16 matmul kernels), takes AVX-512 on any
vendor's CPU. On 2 cores of an AMD EPYC family 26 (Zen 5, whose AVX-512 units are 512
bits wide), 2026-12-07: float32 matmuls of the output layer's shapes at 210 GFLOP/s
through MKL and 480 through oneDNN; lmlab's fused loss at the LSTM's shape in 17.9 ms
against 28.6 ms through MKL (`benchmarks/loss_speed.py --tokens 400 --width 200 --bias`).

lmlab's fused loss (`mm`), its models' linear layers (`Linear`, forward and backward) and
their one-token decoding step (`step_mm`) take oneDNN where `uses_onednn`.

The rule takes oneDNN only where that was measured: AMD CPUs of family 26 on. An AMD
family 25 (Zen 4) also has AVX-512, but on 256-bit units, where it does no more
arithmetic a cycle than MKL's AVX2; it is not measured, so it keeps MKL, as does every
Intel CPU (MKL has its AVX-512 kernels there). `benchmarks/loss_speed.py` prints both
kernels on any machine, to extend the rule where it pays. A fixed rule, not a
measurement: every process of a machine decides alike, so a resumed run computes what
the uninterrupted one did.

torch offers no public switch for float32 matmuls through oneDNN (its
`torch.backends.mkldnn.matmul.fp32_precision` reaches oneDNN only by giving up float32
accuracy). `torch.ops.mkldnn._linear_pointwise` is the op inductor compiles CPU linear
layers to, in every torch since 2.0; it is IEEE float32, as MKL is (tests/test_onednn.py
checks it against `torch.mm` for every layout lmlab uses). It is checked once per
process on a small product; where it is missing, refuses the call or gives another
result, `mm` is `torch.mm`, so a torch that changes it costs speed, not correctness.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmlab.machine import cpu_family, cpu_flags, cpu_vendor

# Tensors, not subclasses that route ops elsewhere (DTensor under FSDP2, fake tensors).
_PLAIN = (Tensor, torch.nn.Parameter)
_forced: bool | None = None  # `forced()`: tests and benchmarks pin the kernel


def _find_op():
    """oneDNN's linear op (x @ weight.T + bias) as this torch names it, or None."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


@functools.cache
def _onednn_linear():
    """`_find_op()` where it gives `torch.mm`'s product on a small check, else None."""
    op = _find_op()
    if op is None:
        return None
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 8, generator=generator), torch.randn(5, 8, generator=generator)
    try:
        product = op(x, weight, None, "none", [], "")
    except (RuntimeError, TypeError):  # a torch whose op takes other arguments
        return None
    same = isinstance(product, Tensor) and product.shape == (3, 5)
    return op if same and torch.allclose(product, x @ weight.T, atol=1e-5) else None


FIRST_AMD_FAMILY = 26  # Zen 5: AVX-512 on 512-bit units, measured (see above)


def cpu_prefers_onednn() -> bool:
    """The rule: oneDNN for float32 on an AMD CPU of family 26 on with AVX-512 (see above)."""
    family = cpu_family()
    return (
        cpu_vendor() == "AuthenticAMD"
        and "avx512f" in (cpu_flags() or [])
        and family is not None
        and family >= FIRST_AMD_FAMILY
    )


@functools.cache
def _machine_choice() -> bool:
    return _onednn_linear() is not None and cpu_prefers_onednn()


def choice() -> str:
    """Which kernel runs the float32 matmuls of the linear layers and the fused loss on this
    machine, and why (train.log)."""
    if _onednn_linear() is None:
        return "torch.mm (this torch has no usable oneDNN linear op)"
    if cpu_prefers_onednn():
        return "oneDNN (an AMD CPU with 512-bit AVX-512 units, where MKL runs AVX2 kernels)"
    return (
        f"torch.mm (oneDNN is taken only on AMD CPUs of family {FIRST_AMD_FAMILY} on, "
        "where it was measured faster)"
    )


def uses_onednn(*tensors: Tensor) -> bool:
    """Whether `mm` of these tensors runs through oneDNN: float32 on the CPU, outside
    torch.compile (inductor picks its own kernels), on a CPU where oneDNN is the faster.
    With no tensors: whether this machine's float32 matmuls do."""
    if torch.compiler.is_compiling():  # first: dynamo would break its graph on what follows
        return False
    enabled = _machine_choice() if _forced is None else _forced and _onednn_linear() is not None
    return enabled and all(
        type(t) in _PLAIN and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


@contextmanager
def forced(enabled: bool) -> Iterator[None]:
    """Run `mm` through oneDNN (True) or `torch.mm` (False) whatever the CPU, inside the block
    (where oneDNN is missing, `torch.mm` either way): for tests and benchmarks."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before


def mm(a: Tensor, b: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """`a @ b + bias` for (M, K) `a`, (K, N) `b` and an (N,) `bias` or None, any strides.

    Through oneDNN where `uses_onednn`, into a new tensor; otherwise `torch.mm`, into
    `out` if given (oneDNN's op has no `out=`: where it runs, `out` is left alone, and
    the caller uses the returned tensor).
    """
    empty = a.numel() == 0 or b.numel() == 0  # oneDNN has no primitive for an empty product
    if not empty and uses_onednn(a, b) and (bias is None or uses_onednn(bias)):
        return _onednn_linear()(a, b.t(), bias, "none", [], "")
    if bias is None:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    # Added after the matmul: addmm into `out` first copies the broadcast bias there,
    # a full extra pass.
    return (torch.mm(a, b) if out is None else torch.mm(a, b, out=out)).add_(bias)


# The fewest rows from which a decoding step's products go through oneDNN where
# `uses_onednn`. On the AMD EPYC family 26 (2 threads, 2026-12-07), on the step's (in, out)
# copies: one row of the `small` block's products is faster through MKL (256 x 768: 9.7
# against 25 us), 4 rows and more through oneDNN (8 rows of 256 x 1,024: 56 against 86 us);
# the output layer (256 x 10,000) through oneDNN from one row (89 against 118 us; 8 rows:
# 130 against 531). End to end: `benchmarks/generate_speed.py --kernels`.
STEP_ROWS = 4


def step_mm(x: Tensor, weight_t: Tensor, bias: Tensor | None = None, head: bool = False) -> Tensor:
    """`x @ weight_t + bias` in a one-token decoding step: `mm` from STEP_ROWS rows of `x` on
    (or from one row for the output layer, `head`), `torch.mm`/`torch.addmm` below."""
    if x.size(0) >= (1 if head else STEP_ROWS) and uses_onednn(x, weight_t):
        return mm(x, weight_t, bias)
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)


class _Linear(torch.autograd.Function):
    """`F.linear` on a 2-D input, its three products through `mm` (oneDNN where it runs)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return mm(x, weight.t(), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        want_x, want_weight, want_bias = ctx.needs_input_grad
        grad_x = mm(grad, weight) if want_x else None
        grad_weight = mm(grad.t(), x) if want_weight else None
        grad_bias = grad.sum(0) if ctx.has_bias and want_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, its products (forward and backward) through oneDNN where
    `uses_onednn` and autocast is off; `F.linear` everywhere else (under autocast, compile,
    on other dtypes, devices and CPUs), so bf16 and compiled runs are unchanged."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_autocast_enabled(x.device.type) or not uses_onednn(*tensors):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.size(-1))
    return _Linear.apply(rows, weight, bias).view(*x.shape[:-1], weight.size(0))


class Linear(torch.nn.Linear):
    """`nn.Linear` whose float32 products on the CPUs of `cpu_prefers_onednn` run through
    oneDNN (`linear`); the same parameters, state dict keys and initialisation."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
