"""The `lstm` family: an nn.LSTM stack, the AWD-LSTM regularisers, the carried state."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.models.dropout import LockedDropout, embedding_dropout
from lmlab.models.lstm import LSTMLM, LSTMConfig


def tiny(**changes) -> LSTMLM:
    torch.manual_seed(0)
    values = dict(vocab_size=30, block_size=8, n_layer=2, n_embd=12, n_hidden=16)
    return LSTMLM(LSTMConfig(**{**values, **changes}))


def test_without_regularisers_it_is_a_plain_lstm_stack_with_a_softmax() -> None:
    model = tiny(tie_weights=False).eval()
    plain = nn.LSTM(12, 16, num_layers=2, batch_first=True)
    with torch.no_grad():
        for layer in range(2):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                own = getattr(model.layers[layer], f"{kind}_l0")
                getattr(plain, f"{kind}_l{layer}").copy_(own)
        idx = torch.randint(0, 30, (3, 8), generator=torch.Generator().manual_seed(1))
        out, _ = plain(model.token_embedding(idx))
        expected = F.linear(out, model.lm_head.weight, model.lm_head.bias)
        torch.testing.assert_close(model(idx), expected, rtol=1e-5, atol=1e-6)


def test_locked_dropout_drops_the_same_units_at_every_step() -> None:
    x = torch.ones(4, 50, 64)
    y = LockedDropout(0.5).train()(x)
    dropped = y == 0
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # one mask per sequence
    assert 0.4 < float(dropped[:, 0].float().mean()) < 0.6
    assert float(y[~dropped].unique()) == pytest.approx(2.0)


def test_embedding_dropout_drops_whole_words() -> None:
    table = nn.Embedding(20, 8)
    idx = torch.tensor([[3, 5, 3, 5, 3, 7]])
    out = embedding_dropout(table, idx, 0.5, training=True)
    zero = (out == 0).all(dim=-1)[0]
    # every occurrence of a word is dropped or kept together
    for word in (3, 5, 7):
        assert len({bool(z) for z, w in zip(zero, idx[0]) if w == word}) == 1
    assert torch.equal(embedding_dropout(table, idx, 0.5, training=False), table(idx))


def test_weight_drop_masks_the_recurrent_weights_anew_each_forward_and_trains_them() -> None:
    model = tiny(weight_drop=0.5).train()
    idx = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(2))
    first, second = model(idx), model(idx)
    assert not torch.allclose(first, second)  # a new DropConnect mask each time
    model.eval()
    assert torch.equal(model(idx), model(idx))  # none in evaluation
    model.train()
    model(idx, targets=idx).backward()
    assert model.layers[0].weight_hh_l0.grad.abs().sum() > 0


def test_a_detached_state_stops_backpropagation_at_the_window() -> None:
    model = tiny().train()
    idx = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(3))
    state = model.new_state(2)
    model(idx[:, :8], targets=idx[:, :8], state=state)
    state.detach()
    assert all(not h.requires_grad and not c.requires_grad for h, c in state.hidden)
    loss = model(idx[:, 8:], targets=idx[:, 8:], state=state)
    loss.backward()  # only through the second window: nothing of the first graph is needed
    saved = state.state_dict()
    fresh = model.new_state(2)
    fresh.load_state_dict(saved)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(state.hidden, fresh.hidden))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(weight_drop=-0.1), r"model.weight_drop must be in \[0, 1\), got -0.1"),
        (dict(dropout_hidden=1.0), r"model.dropout_hidden must be in \[0, 1\), got 1.0"),
        (dict(n_hidden=0), r"model.n_hidden must be a positive integer, got 0"),
        (dict(family="llama"), r"model.family is 'llama' but this is the lstm config"),
    ],
)
def test_bad_values_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**changes)
