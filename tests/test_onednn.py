import weakref

import pytest
import torch
import torch.nn.functional as F

import lmlab.loss as loss_module
import lmlab.onednn as onednn
from lmlab.loss import linear_cross_entropy

needs_onednn = pytest.mark.skipif(
    onednn._onednn_linear() is None, reason="this torch has no oneDNN linear op"
)


def operands(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(37, 24, generator=generator)
    b = torch.randn(24, 53, generator=generator)
    bias = torch.randn(53, generator=generator)
    return a, b, bias


def layouts():
    """Every kind of operand the fused loss hands `mm`: contiguous, transposed views, row slices."""
    a, b, bias = operands()
    wide = torch.randn(53, 30)[:, 3:27]  # rows with a stride longer than their length
    yield "contiguous", a, b
    yield "a transposed view", torch.randn(24, 37).T, b
    yield "b transposed view (an nn.Linear weight)", a, wide.T
    yield "a row slice", torch.randn(50, 24)[5:42], b
    yield "both transposed views", torch.randn(24, 37).T, torch.randn(53, 24).T
    yield "bias", a, b


@needs_onednn
@pytest.mark.parametrize("case", list(layouts()), ids=lambda case: case[0])
def test_onednn_gives_the_float32_product_of_every_layout(case):
    name, a, b = case
    bias = operands()[2] if name == "bias" else None
    with onednn.forced(True):
        assert onednn.uses_onednn(a, b)
        got = onednn.mm(a, b, bias)
    expected = a @ b if bias is None else a @ b + bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32 rounding only


def test_forced_off_is_torch_mm_exactly_and_writes_into_out():
    a, b, bias = operands()
    out = torch.empty(37, 53)
    with onednn.forced(False):
        assert not onednn.uses_onednn(a, b)
        got = onednn.mm(a, b, out=out)
        with_bias = onednn.mm(a, b, bias)
    assert got is out and torch.equal(out, torch.mm(a, b))
    assert torch.equal(with_bias, torch.mm(a, b).add_(bias))


@needs_onednn
def test_only_float32_cpu_tensors_go_through_onednn():
    a, b, _ = operands()
    with onednn.forced(True):
        assert onednn.uses_onednn(a, b)
        assert not onednn.uses_onednn(a.double(), b.double())
        assert not onednn.uses_onednn(a.bfloat16(), b.bfloat16())
        assert onednn.uses_onednn(torch.nn.Parameter(a), b)  # a module's weight
        fake_dtensor = torch.Tensor._make_subclass(type("Wrapped", (torch.Tensor,), {}), a)
        assert not onednn.uses_onednn(fake_dtensor, b)  # other subclasses: left to torch
        got = onednn.mm(a.double(), b.double())
    assert got.dtype == torch.float64 and torch.equal(got, a.double() @ b.double())


@pytest.mark.parametrize(
    "vendor, family, flags, expected",
    [
        ("AuthenticAMD", 26, ["avx2", "avx512f", "avx512_bf16"], True),  # EPYC Zen 5: measured
        ("AuthenticAMD", 25, ["avx2", "avx512f", "avx512_bf16"], False),  # Zen 4: not measured
        ("AuthenticAMD", 23, ["avx2", "fma"], False),  # MKL and oneDNN both AVX2
        ("AuthenticAMD", 27, ["avx2", "fma"], False),  # no AVX-512, whatever the family
        ("GenuineIntel", 6, ["avx2", "avx512f", "amx_bf16"], False),  # MKL has AVX-512 there
        ("", None, [], False),  # no lscpu (not x86 Linux)
    ],
)
def test_the_rule_takes_onednn_only_where_it_was_measured_faster(
    monkeypatch, vendor, family, flags, expected
):
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(onednn, "cpu_family", lambda: family)
    monkeypatch.setattr(onednn, "cpu_flags", lambda: flags or None)
    assert onednn.cpu_prefers_onednn() is expected


@pytest.fixture
def fresh_op_check():
    """`_onednn_linear` checks the op once per process: anew for the test, and after it."""
    onednn._onednn_linear.cache_clear()
    yield
    onednn._onednn_linear.cache_clear()


def test_without_the_op_everything_runs_through_torch_mm(monkeypatch, fresh_op_check):
    monkeypatch.setattr(onednn, "_find_op", lambda: None)
    a, b, _ = operands()
    with onednn.forced(True):
        assert not onednn.uses_onednn(a, b)
        assert torch.equal(onednn.mm(a, b), torch.mm(a, b))
    assert onednn.choice() == "torch.mm (this torch has no usable oneDNN linear op)"


def refuses(*args):
    raise RuntimeError("unexpected arguments")


def answers_wrongly(x, weight, *args):
    return x @ weight.T + 1.0


@pytest.mark.parametrize("op", [refuses, answers_wrongly])
def test_an_op_that_refuses_the_check_or_fails_it_is_never_used(monkeypatch, fresh_op_check, op):
    monkeypatch.setattr(onednn, "_find_op", lambda: op)
    assert onednn._onednn_linear() is None
    a, b, _ = operands()
    with onednn.forced(True):
        assert not onednn.uses_onednn(a, b)
        assert torch.equal(onednn.mm(a, b), torch.mm(a, b))


@needs_onednn
def test_this_torchs_op_passes_the_check(fresh_op_check):
    assert onednn._onednn_linear() is onednn._find_op()


@pytest.mark.parametrize("kernel", [True, False], ids=["onednn", "torch.mm"])
@pytest.mark.parametrize("chunk_rows", [7, 1000])
def test_the_fused_loss_in_float32_equals_cross_entropy_through_either_kernel(kernel, chunk_rows):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(53, 16, generator=generator, requires_grad=True)
    weight = torch.randn(37, 16, generator=generator, requires_grad=True)
    bias = torch.randn(37, generator=generator, requires_grad=True)
    targets = torch.randint(0, 37, (53,), generator=generator)
    targets[::5] = -100
    with onednn.forced(kernel):
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, bias=bias)
        fused_grads = torch.autograd.grad(fused, (hidden, weight, bias))
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100)
    plain_grads = torch.autograd.grad(plain, (hidden, weight, bias))
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for got, expected in zip(fused_grads, plain_grads):
        assert got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_the_choice_says_which_kernel_and_why(monkeypatch):
    monkeypatch.setattr(onednn, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(onednn, "cpu_family", lambda: 26)
    monkeypatch.setattr(onednn, "cpu_flags", lambda: ["avx2", "avx512f"])
    if onednn._onednn_linear() is None:
        assert onednn.choice() == "torch.mm (this torch has no usable oneDNN linear op)"
        return
    assert onednn.choice() == (
        "oneDNN (an AMD CPU with 512-bit AVX-512 units, where MKL runs AVX2 kernels)"
    )
    monkeypatch.setattr(onednn, "cpu_family", lambda: 25)
    assert onednn.choice() == (
        "torch.mm (oneDNN is taken only on AMD CPUs of family 26 on, where it was measured faster)"
    )


def test_a_run_says_in_train_log_which_kernel_runs_the_loss(one_validation_run):
    log = (one_validation_run / "train.log").read_text()
    assert f"float32 matmuls of the linear layers and the fused loss: {onednn.choice()}" in log


def test_a_weight_gradient_larger_than_a_chunk_is_summed_in_place(monkeypatch):
    # oneDNN writes each product anew; at a large vocabulary the weight's gradient would be
    # held twice, so it is summed in place (torch.mm) and only the logits use oneDNN.
    import lmlab.loss

    monkeypatch.setattr(lmlab.loss, "CHUNK_BYTES", 1024)  # 37 x 16 floats: 2,368 bytes
    calls = []
    monkeypatch.setattr(
        onednn,
        "_onednn_linear",
        lambda: lambda *args: calls.append(1) or (torch.nn.functional.linear(*args[:3])),
    )
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(53, 16, generator=generator, requires_grad=True)
    weight = torch.randn(37, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 37, (53,), generator=generator)
    with onednn.forced(True):
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
        grads = torch.autograd.grad(fused, (hidden, weight))
    assert len(calls) == 2 * 4  # logits and the hidden states' gradient, in each of 4 chunks
    plain = F.cross_entropy(hidden @ weight.T, targets)
    for got, expected in zip(grads, torch.autograd.grad(plain, (hidden, weight))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@needs_onednn
def test_a_decoding_step_takes_onednn_from_step_rows_and_for_the_output_layer_always(monkeypatch):
    rows_seen = []
    real_mm = onednn.mm

    def spy(a, *args, **kwargs):
        rows_seen.append(a.size(0))
        return real_mm(a, *args, **kwargs)

    monkeypatch.setattr(onednn, "mm", spy)
    weight_t, bias = torch.randn(24, 53), torch.randn(53)
    with onednn.forced(True):
        for rows in (1, onednn.STEP_ROWS - 1, onednn.STEP_ROWS, 8):
            x = torch.randn(rows, 24)
            block = onednn.step_mm(x, weight_t, bias)
            head = onednn.step_mm(x, weight_t, head=True)
            torch.testing.assert_close(block, torch.addmm(bias, x, weight_t), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(head, x @ weight_t, rtol=1e-5, atol=1e-5)
    step = onednn.STEP_ROWS
    assert rows_seen == [1, step - 1, step, step, 8, 8]


@needs_onednn
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_decoding_step_gives_the_same_logits_through_either_kernel(family):
    from lmlab.models import build_model, config_from_dict

    torch.manual_seed(0)
    values = dict(family=family, vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = build_model(config_from_dict(values)).eval()
    idx = torch.randint(
        0, 50, (onednn.STEP_ROWS + 1, 10), generator=torch.Generator().manual_seed(1)
    )
    logits = {}
    for kernel in (True, False):
        with onednn.forced(kernel), torch.no_grad():
            cache = model.new_state(idx.size(0), max_len=10)
            model(idx[:, :6], state=cache)
            logits[kernel] = torch.cat(
                [model(idx[:, i : i + 1], state=cache) for i in range(6, 10)], 1
            )
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gives_f_linears_output_and_gradients_through_onednn(with_bias):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 24, generator=generator, requires_grad=True)
    weight = torch.randn(40, 24, generator=generator, requires_grad=True)
    bias = torch.randn(40, generator=generator, requires_grad=True) if with_bias else None
    upstream = torch.randn(3, 7, 40, generator=generator)
    results = {}
    for kernel in (True, False):
        with onednn.forced(kernel):
            y = onednn.linear(x, weight, bias)
        inputs = (x, weight) if bias is None else (x, weight, bias)
        results[kernel] = (y, *torch.autograd.grad(y, inputs, upstream))
    with onednn.forced(False):
        assert torch.equal(results[False][0], F.linear(x, weight, bias))  # exactly F.linear
    for got, expected in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_linear_leaves_autocast_and_frozen_inputs_to_torch():
    x, weight = torch.randn(5, 24), torch.randn(40, 24, requires_grad=True)
    with onednn.forced(True), torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn.linear(x, weight).dtype == torch.bfloat16  # autocast's own F.linear
    with onednn.forced(True):
        y = onednn.linear(x, weight)  # x needs no gradient: only the weight's is made
        (grad,) = torch.autograd.grad(y.sum(), weight)
    torch.testing.assert_close(grad, torch.ones(5, 40).t() @ x, rtol=1e-5, atol=1e-5)


def test_linear_module_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(0)
    module = onednn.Linear(24, 40)
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40)
    assert isinstance(module, torch.nn.Linear)
    assert module.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), plain.parameters()))
    x = torch.randn(6, 24)
    torch.testing.assert_close(module(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_an_empty_batch_goes_through_torch_forward_and_backward():
    x = torch.empty(0, 8, requires_grad=True)
    weight, bias = torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True)
    with onednn.forced(True):
        y = onednn.linear(x, weight, bias)
        y.sum().backward()
    assert y.shape == (0, 4)
    assert torch.equal(weight.grad, torch.zeros(4, 8)) and torch.equal(bias.grad, torch.zeros(4))


@needs_onednn
def test_the_fused_loss_lets_each_chunks_logits_go_before_the_next_are_made(monkeypatch):
    # oneDNN writes every chunk's logits into a new tensor: the last chunk's must be freed
    # first, or two chunks (64 MiB each at a 250,000-word vocabulary) are held at once.
    vocab, previous, alive_at_next = 97, [], []

    def spy(a, b, *args, **kwargs):
        product = onednn.mm(a, b, *args, **kwargs)
        if b.shape[1] == vocab:  # a chunk's logits
            alive_at_next.extend(ref() is not None for ref in previous)
            previous[:] = [weakref.ref(product)]
        return product

    monkeypatch.setattr(loss_module, "mm", spy)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (40,), generator=generator)
    with onednn.forced(True):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    assert len(alive_at_next) == 4 and not any(alive_at_next)  # 5 chunks
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets))
