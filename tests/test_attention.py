import pytest
import torch
import torch.nn.functional as F

from lmlab.models.attention import causal_attention, prefers_written_out
from lmlab.models.dropout import Dropout


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_written_out_attention_equals_causal_sdpa_with_its_gradients(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(3, 2, 7, 8, generator=generator).to(dtype).requires_grad_() for _ in range(3)
    )
    ours = causal_attention(q, k, v, Dropout(0.0))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=3e-2)
    torch.testing.assert_close(ours, sdpa, **tolerance)
    weights = torch.randn(ours.shape, generator=generator).to(dtype)
    for got, expected in zip(
        torch.autograd.grad((ours * weights).sum(), (q, k, v)),
        torch.autograd.grad((sdpa * weights).sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, **tolerance)


def test_a_position_never_attends_to_a_later_one():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=generator) for _ in range(3))
    before = causal_attention(q, k, v, Dropout(0.0))
    k2, v2 = k.clone(), v.clone()
    k2[..., 4:, :] += 5.0
    v2[..., 4:, :] -= 3.0
    after = causal_attention(q, k2, v2, Dropout(0.0))
    torch.testing.assert_close(after[..., :4, :], before[..., :4, :], rtol=0, atol=0)
    assert not torch.allclose(after[..., 4:, :], before[..., 4:, :])


def test_written_out_only_where_sdpa_is_slower():
    fp32, bf16 = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    assert not prefers_written_out(fp32, 0.0)  # SDPA's flash kernel is the fastest in fp32
    assert prefers_written_out(fp32, 0.1)  # with dropout SDPA falls back to math on CPU
    assert prefers_written_out(bf16, 0.0)  # its bf16 backward is 4x slower than written out
