"""The branches lmlab takes only on a CUDA device; skipped (never failed) on a machine without one.

On CPU the fused loss may skip the max-shift and reads scalars on the host, Dropout
draws its own masks and NonFiniteGuard checks each loss at once. On a GPU the loss
always shifts and never syncs, Dropout is `F.dropout`, the guard reads each loss one
step late from pinned memory, and decoding runs on the device.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lmlab.decoding import beam_search, generate
from lmlab.dynamic_eval import DynamicEval, dynamic_perplexity, gradient_rms
from lmlab.errors import UserError
from lmlab.failsafe import NonFiniteGuard
from lmlab.loss import linear_cross_entropy
from lmlab.models.dropout import Dropout
from lmlab.models.gpt import GPTLM, GPTConfig
from lmlab.neural_cache import NeuralCache, cache_perplexity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_on_the_gpu_equals_cross_entropy(reduction: str) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=generator).to(CUDA).requires_grad_()
    weight = torch.randn(1000, 32, generator=generator).to(CUDA).requires_grad_()
    targets = torch.randint(0, 1000, (300,), generator=generator).to(CUDA)
    targets[::7] = -100
    fused = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_rows=64)
    loss = fused if reduction == "mean" else fused[0] / fused[1]
    grads = torch.autograd.grad(loss, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets)
    expected = torch.autograd.grad(plain, (hidden, weight))
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_dropout_on_the_gpu_keeps_the_mean_and_drops_p() -> None:
    x = torch.ones(4_000_000, device=CUDA)
    y = Dropout(0.25).train()(x)
    assert abs(float((y == 0).float().mean()) - 0.25) < 2e-3
    assert abs(float(y.mean()) - 1.0) < 3e-3


def test_decoding_on_the_gpu_equals_the_cpu() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = GPTLM(config).eval()
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(1))
    on_cpu = generate(model, prompt, 20, temperature=0.0)
    on_gpu = generate(model.to(CUDA), prompt.to(CUDA), 20, temperature=0.0)
    assert torch.equal(on_cpu, on_gpu.cpu())
    beams, _ = beam_search(model, prompt.to(CUDA), 10, num_beams=3)
    assert beams.shape == (3, 15) and beams.device.type == "cuda"


def test_the_guard_reads_gpu_losses_one_step_late_and_before_any_save() -> None:
    class Trainer:  # what NonFiniteGuard reads of a trainer
        global_step = 1
        world_size = 1
        checkpoint_callbacks: list = []
        default_root_dir = "."

    guard, trainer = NonFiniteGuard(), Trainer()
    guard.on_train_batch_end(trainer, None, torch.tensor(2.0, device=CUDA))
    trainer.global_step = 2
    guard.on_train_batch_end(trainer, None, torch.tensor(float("nan"), device=CUDA))  # pending
    with pytest.raises(UserError, match="training loss is nan at step 2"):
        guard.on_save_checkpoint(trainer)


def test_a_bf16_training_step_runs_on_the_gpu(tmp_path) -> None:
    from torch.utils.data import DataLoader

    from lmlab.lit_module import LanguageModel

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(62)]
    module = LanguageModel(config, words, optimizer=torch.optim.AdamW)
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    batches = DataLoader([(tokens[:, :-1], tokens[:, 1:])] * 4, batch_size=None)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=batches)
    assert trainer.global_step == 4
    assert all(p.isfinite().all() for p in module.parameters())


def test_the_cache_and_dynamic_evaluation_on_the_gpu_equal_the_cpu() -> None:
    # the split's tokens stay on the host; each window moves to the model's device
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPTLM(config).eval()
    tokens = torch.randint(0, 40, (100,), generator=torch.Generator().manual_seed(1))
    cache = NeuralCache(size=30, theta=1.0, lambda_=0.3)
    settings = DynamicEval(lr=0.1, decay=0.01, method="sgd", segment=4)
    results = []
    for device in ("cpu", CUDA):
        model.to(device)
        scored = cache_perplexity(model, tokens, cache, seq_len=16, stride=4)
        rms = gradient_rms(model, tokens, seq_len=8, batch_size=2, max_batches=2)
        dynamic = dynamic_perplexity(model, tokens, settings, context=16, cache=cache)
        results.append(
            (scored["ppl"], dynamic["ppl"], dynamic["cache"]["ppl"], float(rms[0].sum()))
        )
    for cpu, gpu in zip(*results, strict=True):
        assert gpu == pytest.approx(cpu, rel=1e-4)


@pytest.mark.slow
def test_fsdp_on_one_gpu_trains_checkpoints_and_matches_a_plain_gpu_run(
    corpus_dir, cache_dir, tmp_path
) -> None:
    # CPU cannot run it: Lightning refuses FSDPStrategy without a GPU (see docs/scaling.md)
    from conftest import run_entry_point, tiny_overrides

    def train(name: str, *trainer: str) -> dict:
        run = tmp_path / name
        overrides = [o for o in tiny_overrides(corpus_dir, cache_dir, run) if o != "trainer=cpu"]
        result = run_entry_point("train.py", *overrides, *trainer, "trainer.max_epochs=1")
        assert result.returncode == 0, result.stderr[-3000:]
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # one plain file
        return json.loads((run / "result.json").read_text())

    sharded = train("fsdp", "trainer=fsdp", "trainer.devices=1", "trainer.precision=32-true")
    plain = train("gpu", "trainer=gpu", "trainer.precision=32-true")
    assert sharded["steps"] == plain["steps"]
    for key in ("best_val_ppl", "test_ppl"):
        assert math.isclose(sharded[key], plain[key], rel_tol=1e-4), key
