import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lmlab.data import IGNORE_INDEX
from lmlab.lit_module import LanguageModel
from lmlab.metrics import Perplexity
from lmlab.models.gpt import GPTConfig


def _batches(vocab_size: int, seq_len: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches of random blocks; the last one ends in padding, as a split's last block does."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        tokens = torch.randint(0, vocab_size, (2, seq_len + 1), generator=generator)
        batches.append((tokens[:, :-1], tokens[:, 1:].clone()))
    batches[2][1][1, 3:] = IGNORE_INDEX  # padding of the last block is not a token
    return batches


def test_perplexity_is_exp_of_mean_nll_over_real_targets_across_batches():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, 7, generator=generator) for _ in range(3)]
    targets = [torch.randint(0, 7, (2, 5), generator=generator) for _ in range(3)]
    targets[2][1, 3:] = IGNORE_INDEX
    metric = Perplexity()
    for x, y in zip(logits, targets):
        nll = F.cross_entropy(x.flatten(0, 1), y.flatten(), reduction="sum")
        metric.update(nll, (y != IGNORE_INDEX).sum())
    log_probs = torch.cat([F.log_softmax(x, -1).flatten(0, 1) for x in logits])
    flat = torch.cat([y.flatten() for y in targets])
    real = flat != IGNORE_INDEX
    nll = -log_probs[real].gather(1, flat[real, None]).mean().item()
    assert abs(metric.compute().item() / math.exp(nll) - 1) < 1e-6
    assert int(metric.count) == 28


def test_validation_through_the_fused_loss_equals_the_full_logits_perplexity():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=32)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(48)]
    module = LanguageModel(config, words, optimizer=torch.optim.AdamW).eval()
    batches = _batches(config.vocab_size)
    with torch.no_grad():
        for batch in batches:
            module.validation_step(batch, 0)
        fused = module.val_ppl.compute().item()
        # the old path: the (B, T, vocab) logits, then cross-entropy over the real targets
        logits = torch.cat([module(x).flatten(0, 1) for x, _ in batches]).double()
        targets = torch.cat([y.flatten() for _, y in batches])
        full = math.exp(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).item())
    assert abs(fused / full - 1) < 1e-6
    assert int(module.val_ppl.count) == int((targets != IGNORE_INDEX).sum())


def test_training_validation_and_test_share_one_loss_path():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(48)]
    module = LanguageModel(config, words, optimizer=torch.optim.AdamW).eval()
    calls = []
    model_step = module.model_step
    module.model_step = lambda batch, reduction="sum", stage="val": (
        calls.append((reduction, stage)) or model_step(batch, reduction, stage)
    )
    module.trainer = L.Trainer(logger=False, enable_progress_bar=False)  # for log_every_n_steps
    batch = _batches(config.vocab_size)[2]
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        module.validation_step(batch, 0)
        module.test_step(batch, 0)
    assert calls == [("mean", "train"), ("sum", "val"), ("sum", "test")]
    nll, count = model_step(batch)
    torch.testing.assert_close(loss, nll / count, rtol=1e-6, atol=0)
    assert torch.equal(module.val_ppl.nll, module.test_ppl.nll)


def test_perplexity_of_a_perfect_model_is_one_and_uniform_is_vocab_size():
    targets = torch.tensor([1, 2, 3])
    confident = torch.full((3, 5), -1e4).scatter(1, targets[:, None], 0.0)
    metric = Perplexity()
    metric.update(F.cross_entropy(confident, targets, reduction="sum"), 3)
    assert abs(metric.compute().item() - 1.0) < 1e-6
    metric.reset()
    metric.update(F.cross_entropy(torch.zeros(3, 5), targets, reduction="sum"), 3)
    assert abs(metric.compute().item() - 5.0) < 1e-5


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_before_a_fused_adamw_step(precision: str):
    # Lightning itself refuses to clip for a fused optimizer under any mixed precision.
    torch.manual_seed(0)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(30)]
    config = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
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


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")
def test_a_step_drops_the_last_steps_gradients_before_its_forward_but_accumulation_keeps_them():
    # The fused loss makes the new output-layer gradient in the forward pass: the old one
    # must be gone by then (at a 250,000-word vocabulary it is 244 MiB of `small`).
    torch.manual_seed(0)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(30)]
    config = GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    module = LanguageModel(config, words, optimizer=torch.optim.AdamW)
    held_at_forward: list[bool] = []
    module.model.register_forward_pre_hook(
        lambda model, args: held_at_forward.append(
            any(p.grad is not None for p in model.parameters())
        )
    )
    tokens = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(1))
    batches = DataLoader([(tokens[:, :-1], tokens[:, 1:])] * 4, batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=batches)
    # batches 0 and 2 start an optimizer step; batches 1 and 3 add to the gradient of 0 and 2
    assert held_at_forward == [False, True, False, True]
