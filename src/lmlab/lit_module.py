"""LightningModule glue around a language model of any family: one loss path, perplexity,
logging, the optimizer, and the state carried through the contiguous data order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torch.optim import Optimizer

from lmlab.checkpoint import METADATA_KEY, checkpoint_metadata
from lmlab.metrics import Perplexity, TextScores, UnitCounts
from lmlab.models import ModelConfig, build_model
from lmlab.models.interface import State, compile_blocks
from lmlab.tokenizers import tokenizer_from_dict

# What FSDPStrategy (FSDP1) puts in the names of the parameters it wraps.
FSDP_WRAPPER = "_fsdp_wrapped_module."
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
CARRIED_KEY = "lmlab_carried_state"  # checkpoint[...]: the training state carried mid-epoch


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        model_config: ModelConfig,
        vocab_words: list[str],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        compile: bool = False,
        carry_state: bool = False,
        tokenizer: dict | None = None,
    ) -> None:
        """`tokenizer`: the tokenizer's `to_dict()` (None: `word`), saved in every checkpoint
        beside `vocab_words`. `carry_state`: the batches come in the contiguous data order (`data.order`), so a
        model that carries state (`carries_state`, the LSTM) hands each window's final
        state to the next window of its stream, within each epoch, validation and test."""
        super().__init__()
        self.model = build_model(model_config)
        self.carry_state = carry_state and self.model.carries_state
        self._states: dict[str, tuple[int, State]] = {}  # stage -> (epoch, its state)
        self._restored: dict | None = None  # a resumed run's carried training state
        # Matrices and embeddings decay; biases and LayerNorm gains do not. Decided
        # here, on whole tensors and by name: under FSDP they are flat 1-D shards by the
        # time configure_optimizers runs, and FSDP2 (trainer=fsdp2) replaces the Parameter
        # objects with DTensors (so an id() kept from here could be reused by another).
        self._no_decay = {n for n, p in self.model.named_parameters() if p.dim() < 2}
        if compile:
            compile_blocks(self.model)  # in place, so state_dict keys stay clean
        self.vocab_words = list(vocab_words)
        self.tokenizer = dict(tokenizer or {"kind": "word"})
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()
        # word-level perplexity and bits per character (val/word_ppl, val/bpc), any tokenizer
        self._units: UnitCounts | None = None  # built at the first validation or test batch
        self._step_lr: float | None = None  # the learning rate of the step being made
        self.val_text = TextScores()
        self.test_text = TextScores()

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def model_step(
        self, batch: tuple[Tensor, Tensor], reduction: str = "sum", stage: str = "val"
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Every stage's one loss: the batch's targets scored by the loss fused with the output layer.

        `reduction="sum"` (validation, test): the summed NLL and how many targets
        were scored, what `Perplexity` adds up over a split; `"mean"` (training):
        their mean, whose gradient the fused loss finishes in its forward pass (a
        sum divided by the count afterwards would cost one more pass over the
        gradients, 1.4% of a `small` step on 2 CPU cores). No stage materialises
        the (B, T, vocab) logits; padding targets are IGNORE_INDEX (-100) and do
        not count. With `carry_state`, the batch continues `stage`'s state.
        """
        inputs, targets = batch
        state = self._carried(stage, inputs.size(0)) if self.carry_state else None
        return self.model(inputs, targets=targets, state=state, reduction=reduction)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch, reduction="mean", stage="train")
        # Only on the steps whose logs Lightning writes (every trainer.log_every_n_steps):
        # the two self.log calls cost ~1.4 ms of Python, 0.6% of a `small` step on 2 CPU cores.
        # RunRecorder records every step's loss from the returned value anyway.
        if self._writes_logs_at(self.global_step + 1):  # the step this batch makes
            self._log_training(loss, self._step_lr)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning also writes a step's logs when the run stops there (trainer.should_stop:
        # its last step, a time budget, a signal; set by the callbacks, which run before
        # this hook). Logged here, that step's own loss and learning rate (the scheduler
        # has stepped already) are written, not the last ones training_step logged again.
        if self.trainer.should_stop and not self._writes_logs_at(self.global_step):  # made
            self._log_training(outputs["loss"], self._step_lr)

    def _writes_logs_at(self, steps_done: int) -> bool:
        every = self.trainer.log_every_n_steps
        return bool(every) and steps_done % every == 0

    def _log_training(self, loss: Tensor, lr: float | None) -> None:
        self.log("train/loss", loss, prog_bar=True)
        if lr is not None:
            self.log("train/lr", lr)

    def on_train_batch_start(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # The first batch of an optimizer step (of its accumulation window) drops the last
        # step's gradients before its forward pass. Lightning drops them only after
        # training_step, and the fused loss (lmlab.loss) computes the output layer's new
        # gradient in that forward, so both would be held at once: one vocab x n_embd tensor
        # more (244 MiB for `small` at a 250,000-word vocabulary). Callbacks still see the
        # gradients in on_train_batch_end. The same gradients either way.
        if self.automatic_optimization and batch_idx % self.trainer.accumulate_grad_batches == 0:
            for optimizer in self.trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)
        optimizers = self.trainer.optimizers
        self._step_lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._score(batch, "val", self.val_ppl, self.val_text)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._score(batch, "test", self.test_ppl, self.test_text)

    def _score(
        self, batch: tuple[Tensor, Tensor], stage: str, ppl: Perplexity, text: TextScores
    ) -> None:
        nll, count = self.model_step(batch, stage=stage)
        ppl.update(nll, count)
        if self._units is None:
            tokenizer = tokenizer_from_dict(self.tokenizer, self.vocab_words)
            self._units = UnitCounts(tokenizer.units(), tokenizer.eos_id)
        text.update(nll, *self._units(*batch))

    def on_validation_epoch_start(self) -> None:
        self._states.pop("val", None)  # each validation reads its split from the start

    def on_test_epoch_start(self) -> None:
        self._states.pop("test", None)

    def _carried(self, stage: str, batch_size: int) -> State:
        """The state this batch continues: the previous batch's, detached, within one pass.

        Training starts a fresh state each epoch (a resumed run takes the one its
        checkpoint carries); validation and test start one each time they run.
        """
        epoch = self.current_epoch if stage == "train" else -1
        entry = self._states.get(stage)
        if entry is not None and entry[0] == epoch and entry[1].batch_size == batch_size:
            state = entry[1]
            state.detach()  # truncated backpropagation: the graph stops at the window's start
            return state
        state = self.model.new_state(batch_size)
        restored, self._restored = self._restored, None
        if stage == "train" and restored is not None and restored["epoch"] == epoch:
            rank = self.global_rank if restored["ranks"] > 1 else 0
            state.load_state_dict({k: v[rank] for k, v in restored["state"].items()})
        self._states[stage] = (epoch, state)
        return state

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val", self.val_ppl, self.val_text)

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test", self.test_ppl, self.test_text)

    def _log_perplexity(self, stage: str, metric: Perplexity, text: TextScores) -> None:
        # compute() sums log-probabilities and token counts over every batch
        # (and every process), so this is the perplexity of the whole split.
        ppl = metric.compute()
        word_ppl, bpc = text.compute()
        metric.reset()
        text.reset()
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")
        self.log(f"{stage}/loss", ppl.log())
        self.log(f"{stage}/word_ppl", word_ppl)
        self.log(f"{stage}/bpc", bpc)

    def configure_model(self) -> None:
        """Shard the model when the strategy leaves that to the module (ModelParallelStrategy).

        Lightning calls this before fit and again before test: shard once.
        Other strategies (DDP, FSDPStrategy) wrap the model themselves.
        """
        from lightning.pytorch.strategies import ModelParallelStrategy
        from torch.distributed.fsdp import FSDPModule

        from lmlab.distributed import shard_each_block

        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not isinstance(
            self.model, FSDPModule
        ):
            shard_each_block(self.model, self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                small = name.replace(FSDP_WRAPPER, "") in self._no_decay
                (no_decay if small else decay).append(param)
        optimizer = self.optimizer_factory(
            [
                {"params": decay},  # the optimizer's own weight_decay
                {"params": no_decay, "weight_decay": 0.0},
            ]
        )
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's MixedPrecision refuses to clip for a fused optimizer, since fp16's
        # GradScaler leaves the gradients scaled until the fused step unscales them. It
        # refuses under bf16-mixed too, where there is no scaler and the gradients are
        # true (Lightning issue #21435), so there lmlab clips as plain precision does.
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[METADATA_KEY] = checkpoint_metadata(
            self.model.config, self.vocab_words, self.tokenizer
        )
        entry = self._states.get("train")
        if self.carry_state and entry is not None:
            # Every rank carries its own streams' state: gathered, so each gets its own back.
            values = entry[1].state_dict()
            if self.trainer.world_size > 1:
                values = {k: self.all_gather(v) for k, v in values.items()}
            else:
                values = {k: v[None] for k, v in values.items()}
            checkpoint[CARRIED_KEY] = {
                "epoch": entry[0],
                "ranks": self.trainer.world_size,
                "state": {k: v.cpu() for k, v in values.items()},
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = checkpoint.get(CARRIED_KEY)
