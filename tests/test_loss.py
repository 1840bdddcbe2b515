import pytest
import torch
import torch.nn.functional as F

import lmlab.loss
from lmlab.loss import exp_logits_and_nll, linear_cross_entropy
from lmlab.models.gpt import GPTLM, GPTConfig


def problem(n: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 16, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(37, 16, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 37, (n,), generator=generator)
    targets[::5] = -100  # padding positions do not count
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(chunk_rows: int):
    hidden, weight, targets = problem(53, torch.float64)  # 53 rows: the last chunk is short
    fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    fused_grads = torch.autograd.grad(3.0 * fused, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    plain_grads = torch.autograd.grad(3.0 * plain, (hidden, weight))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert fused_grads[0][::5].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_sum_reduction_gives_the_summed_nll_and_the_count(chunk_rows: int):
    hidden, weight, targets = problem(53, torch.float64)
    nll, count = linear_cross_entropy(
        hidden, weight, targets, reduction="sum", chunk_rows=chunk_rows
    )
    fused_grads = torch.autograd.grad(nll / count, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100, reduction="sum")
    plain_grads = torch.autograd.grad(plain / 42, (hidden, weight))
    assert int(count) == int((targets != -100).sum()) == 42
    torch.testing.assert_close(nll, plain, rtol=1e-12, atol=0)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")


@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_an_output_bias_gets_its_loss_and_gradient(chunk_rows: int):
    hidden, weight, targets = problem(53, torch.float64)
    bias = torch.randn(37, dtype=torch.float64, requires_grad=True)
    fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, bias=bias)
    fused_grads = torch.autograd.grad(2.0 * fused, (hidden, weight, bias))
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100)
    plain_grads = torch.autograd.grad(2.0 * plain, (hidden, weight, bias))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_float32_matches_within_rounding_and_only_requested_gradients_are_made():
    hidden, weight, targets = problem(200, torch.float32)
    fused = linear_cross_entropy(hidden, weight.detach(), targets)
    plain = F.cross_entropy(hidden @ weight.detach().T, targets)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(fused, hidden)
    (expected,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), plain.detach())


def test_every_target_ignored_gives_nan_as_cross_entropy_does():
    hidden, weight, targets = problem(4, torch.float32)
    targets[:] = -100
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets))
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, targets))


def matmul_dtypes(run) -> set[str]:
    """The input dtypes of every aten::mm that `run()` calls, from torch's profiler."""
    with torch.profiler.profile(record_shapes=True) as profile:
        run()
    return {d for e in profile.events() if e.name == "aten::mm" for d in e.input_dtypes if d}


@pytest.mark.parametrize("chunk_rows", [16, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_under_bf16_autocast_the_matmuls_are_bf16_and_the_gradients_float32(
    chunk_rows: int, with_bias: bool
):
    hidden, weight, targets = problem(53, torch.float32)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(1)) if with_bias else None
    bias = None if bias is None else bias.requires_grad_()
    params = (hidden, weight) + ((bias,) if with_bias else ())
    exact = F.cross_entropy(
        F.linear(hidden.double(), weight.double(), None if bias is None else bias.double()),
        targets,
    )
    exact_grads = torch.autograd.grad(exact, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, bias=bias)
        bf16_logits = F.linear(hidden, weight, bias)
    assert bf16_logits.dtype == torch.bfloat16
    plain = F.cross_entropy(bf16_logits.float(), targets)  # the reference: bf16 logits
    assert fused.dtype == torch.float32
    # bf16 rounds each logit by up to 2^-9 of it; both losses carry that error, alike
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=0)
    assert abs(fused.item() - exact.item()) < 2e-2
    fused_grads = torch.autograd.grad(fused, params)
    plain_grads = torch.autograd.grad(plain, params)
    for got, reference, truth in zip(fused_grads, plain_grads, exact_grads, strict=True):
        assert got.dtype == torch.float32
        scale = truth.abs().max()
        torch.testing.assert_close(got, reference, rtol=0, atol=2e-2 * float(scale))
        torch.testing.assert_close(got, truth, rtol=0, atol=2e-2 * float(scale))
    assert fused_grads[0][::5].abs().max() == 0  # ignored rows get no gradient

    def forward_and_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows).backward()

    assert matmul_dtypes(forward_and_backward) == {"c10::BFloat16"}


def test_bf16_weights_get_a_float32_loss_and_bf16_gradients():
    hidden, weight, targets = problem(40, torch.float32)
    hidden = hidden.detach().bfloat16().requires_grad_()
    weight = weight.detach().bfloat16().requires_grad_()
    fused = linear_cross_entropy(hidden, weight, targets)
    plain = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=0)
    for got, expected in zip(
        torch.autograd.grad(fused, (hidden, weight)),
        torch.autograd.grad(plain, (hidden, weight)),
        strict=True,
    ):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))


def test_float16_falls_back_to_float32_logits():
    hidden, weight, targets = problem(40, torch.float32)
    hidden, weight = hidden.detach().half(), weight.detach().half()
    bias = torch.randn(37, generator=torch.Generator().manual_seed(1))  # kept fp32, as autocast
    fused = linear_cross_entropy(hidden, weight, targets, bias=bias)
    assert fused.dtype == torch.float32
    plain = F.cross_entropy(F.linear(hidden, weight, bias.half()).float(), targets)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)


def test_shapes_are_checked():
    hidden, weight, targets = problem(6, torch.float32)
    with pytest.raises(ValueError, match=r"hidden \(N, C\) and targets \(N,\), got \(6, 16\)"):
        linear_cross_entropy(hidden, weight, targets[:5])


def test_model_loss_equals_cross_entropy_of_its_logits_with_the_tied_weight():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16)
    model = GPTLM(config).double().eval()
    idx = torch.randint(0, 50, (3, 8))
    targets = torch.randint(0, 50, (3, 8))
    targets[2, 5:] = -100
    fused = model(idx, targets=targets)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
    # The embedding table is also the output layer: both of its gradients must arrive.
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_second_backward_through_one_forward_is_refused():
    hidden, weight, targets = problem(20, torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot backpropagate twice through one forward"):
        loss.backward()


@pytest.mark.parametrize("unshifted", [True, False])
def test_exps_and_nll_give_the_softmax_and_cross_entropy(unshifted: bool):
    hidden, weight, targets = problem(30, torch.float32)
    logits = hidden.detach() @ weight.detach().T
    targets = targets.clamp(min=0)[:, None]
    exps, sums, nll = exp_logits_and_nll(logits.clone(), targets, unshifted=unshifted)
    torch.testing.assert_close(exps / sums, logits.softmax(dim=-1))
    torch.testing.assert_close(
        nll, F.cross_entropy(logits, targets[:, 0], reduction="none")[:, None]
    )


def test_logits_too_large_for_an_unshifted_exp_give_cross_entropy():
    # Logits in the hundreds: exp would overflow, and most targets' probabilities
    # underflow float32, so the loss takes the max-shifted path for these rows.
    hidden, weight, targets = problem(40, torch.float32)
    hidden = (25.0 * hidden).detach().requires_grad_()
    fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    plain = F.cross_entropy(hidden @ weight.T, targets)
    assert torch.isfinite(fused) and fused > 50
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(fused, hidden)[0], torch.autograd.grad(plain, hidden)[0]
    )


def test_only_chunks_whose_logits_could_overflow_exp_are_shifted(monkeypatch):
    paths = []

    def recording(logits, target, unshifted):
        paths.append(unshifted)
        return exp_logits_and_nll(logits, target, unshifted)

    monkeypatch.setattr(lmlab.loss, "exp_logits_and_nll", recording)
    hidden, weight, targets = problem(32, torch.float32)
    hidden = torch.cat([hidden[:16], 25.0 * hidden[16:]]).detach().requires_grad_()
    fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    assert paths == [True, False]
    plain = F.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(fused, hidden)[0], torch.autograd.grad(plain, hidden)[0]
    )


def test_a_large_vocabulary_gets_fewer_rows_per_chunk_and_ptb_keeps_512():
    assert lmlab.loss.rows_per_chunk(10_000, torch.float32) == lmlab.loss.CHUNK_ROWS == 512
    assert lmlab.loss.rows_per_chunk(32_000, torch.float32) == 512  # a BPE vocabulary
    for dtype in (torch.float32, torch.bfloat16):
        rows = lmlab.loss.rows_per_chunk(250_000, dtype)
        assert 16 <= rows < 512 and rows * 250_000 * dtype.itemsize <= lmlab.loss.CHUNK_BYTES
    assert lmlab.loss.rows_per_chunk(10**9, torch.float32) == 16  # never fewer


def test_the_default_chunking_by_bytes_gives_the_same_loss_and_gradients(monkeypatch):
    hidden, weight, targets = problem(53, torch.float64)
    monkeypatch.setattr(lmlab.loss, "CHUNK_BYTES", 16 * 37 * 8)  # 16 rows of 37 float64 logits
    assert lmlab.loss.rows_per_chunk(37, torch.float64) == 16  # four chunks, the last short
    fused = linear_cross_entropy(hidden, weight, targets)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_bf16_gradient_added_a_slice_of_rows_at_a_time_is_the_same(monkeypatch, with_bias):
    hidden, weight, targets = problem(53, torch.float32)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(1)).requires_grad_()
    bias = bias if with_bias else None
    params = (hidden, weight) + ((bias,) if with_bias else ())

    def grads() -> tuple[torch.Tensor, ...]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16, bias=bias)
        return torch.autograd.grad(loss, params)

    whole = grads()
    monkeypatch.setattr(lmlab.loss, "ACCUMULATE_ROWS", 8)  # 37 rows: five slices, one short
    for got, want in zip(grads(), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
