"""`compile=true`: each block of the Transformer families compiles as one graph, and never recompiles
after warm-up."""

from __future__ import annotations

import pytest
import torch

from lmlab.lit_module import LanguageModel
from lmlab.models import build_model, preset
from lmlab.models.gpt import GPTConfig
from lmlab.models.interface import compile_blocks
from lmlab.models.llama import LlamaConfig

pytestmark = pytest.mark.slow  # each compile takes 5-15 s on 2 CPU cores

CONFIGS = {
    # dropout everywhere it can be: lmlab's cheap CPU masks must not break the graph
    "gpt": GPTConfig(
        vocab_size=60, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.1, attn_dropout=0.1
    ),
    "llama": LlamaConfig(
        vocab_size=60, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, dropout=0.1
    ),
}


@pytest.mark.parametrize("family", CONFIGS)
def test_each_compiled_block_is_one_graph_and_new_batches_do_not_recompile(family: str):
    torch.manual_seed(0)
    model = build_model(CONFIGS[family]).train()
    keys = list(model.state_dict())
    compile_blocks(model, fullgraph=True)  # a graph break would raise instead of splitting
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        idx, targets = torch.randint(0, 60, (2, 4, 16), generator=generator)
        loss = model(idx, targets=targets)
        loss.backward()
        return loss.item()

    losses = [step() for _ in range(2)]  # warm-up: the forward and backward graphs compile
    torch.compiler.set_stance("fail_on_recompile")
    try:
        losses += [step() for _ in range(3)]  # new tokens, same shapes: the same graphs
    finally:
        torch.compiler.set_stance("default")
    assert all(loss == loss and loss > 0 for loss in losses)
    assert list(model.state_dict()) == keys  # compiled in place: checkpoint keys stay clean


def test_compile_true_on_a_family_without_blocks_compiles_it_whole():
    # the LSTM has no `blocks` (compile=auto never compiles it; compile=true still may)
    torch.manual_seed(0)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(58)]
    config = preset("lstm_tiny", vocab_size=60, block_size=16)
    eager = LanguageModel(config, words, optimizer=torch.optim.SGD)
    torch.manual_seed(0)
    compiled = LanguageModel(config, words, optimizer=torch.optim.SGD, compile=True)
    idx, targets = torch.randint(0, 60, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    eager.model.eval(), compiled.model.eval()
    with torch.no_grad():
        expected = eager.model(idx, targets=targets)
        assert torch.allclose(compiled.model(idx, targets=targets), expected, atol=1e-5)
