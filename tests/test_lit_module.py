import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lmlab.data import IGNORE_INDEX
from lmlab.lit_module import LanguageModel, Perplexity
from lmlab.model import TransformerConfig


def test_perplexity_is_exp_of_mean_nll_over_real_targets_across_batches():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, 7, generator=generator) for _ in range(3)]
    targets = [torch.randint(0, 7, (2, 5), generator=generator) for _ in range(3)]
    targets[2][1, 3:] = IGNORE_INDEX  # padding of the last block is not a token
    metric = Perplexity()
    for x, y in zip(logits, targets):
        metric.update(x, y)
    log_probs = torch.cat([F.log_softmax(x, -1).flatten(0, 1) for x in logits])
    flat = torch.cat([y.flatten() for y in targets])
    real = flat != IGNORE_INDEX
    nll = -log_probs[real].gather(1, flat[real, None]).mean().item()
    assert abs(metric.compute().item() / math.exp(nll) - 1) < 1e-6
    assert int(metric.count) == 28


def test_perplexity_of_a_perfect_model_is_one_and_uniform_is_vocab_size():
    targets = torch.tensor([[1, 2, 3]])
    confident = torch.full((1, 3, 5), -1e4).scatter(2, targets[..., None], 0.0)
    metric = Perplexity()
    metric.update(confident, targets)
    assert abs(metric.compute().item() - 1.0) < 1e-6
    metric.reset()
    metric.update(torch.zeros(1, 3, 5), targets)
    assert abs(metric.compute().item() - 5.0) < 1e-5


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_before_a_fused_adamw_step(precision: str):
    # Lightning itself refuses to clip for a fused optimizer under any mixed precision.
    torch.manual_seed(0)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(30)]
    config = TransformerConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)
    module = LanguageModel(config, words, optimizer=optimizer)
    norms: list[float] = []

    class RecordGradientNorm(L.Callback):
        # The gradients the step used are still there after it; the next step zeroes them.
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [p.grad.norm() for p in pl_module.parameters()]
            norms.append(torch.linalg.vector_norm(torch.stack(grads)).item())

    tokens = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(1))
    batches = DataLoader([(tokens[:, :-1], tokens[:, 1:])] * 3, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=3,
        gradient_clip_val=1e-3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordGradientNorm()],
    )
    trainer.fit(module, train_dataloaders=batches)
    assert len(norms) == 3
    assert max(norms) == pytest.approx(1e-3, rel=1e-3)  # clipped (unclipped norms are ~1)
