"""Callbacks for what Lightning lacks: the run's own record, progress, parameters, sample text.

- `RunRecorder` counts tokens and records train/loss, train/lr and the val/
  metrics per step in `metrics.jsonl`, without a per-step device sync, and
  draws `plots/curves.png` at the end of fitting.
- `ProgressBar` is Lightning's Rich bar with loss, val ppl, tokens/s and the
  run's step count and ETA.
- `ParameterSummary` prints the parameters per part (embeddings, attention,
  MLP, norms) at the start of fitting.
- `SampleText` decodes a few fixed prompts at each validation and logs them
  to TensorBoard / W&B and `samples.md`.
- `ModelFiles` writes `vocab.json` and `model_config.json` beside the
  checkpoints: readable copies of what every checkpoint carries.

Everything that writes files or prints runs on global rank 0 only.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from torch import Tensor

from lmlab.decoding import generate
from lmlab.vocab import Vocabulary

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plots/curves.png"
SAMPLES_FILE = "samples.md"

C = TypeVar("C", bound=Callback)


def find_callback(trainer: L.Trainer, kind: type[C]) -> C | None:
    """The trainer's first callback of type `kind`, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


def _fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == "fit" and not trainer.sanity_checking


def _batch_tokens(batch: Any) -> int:
    """Tokens in a batch, from its shape only: no device sync."""
    inputs = batch[0] if isinstance(batch, tuple | list) else batch
    return inputs.numel() if isinstance(inputs, Tensor) else 0


# ---------------------------------------------------------------------------
# The run's own record.


class RunRecorder(Callback):
    """Count tokens, record the curves of a run in `metrics.jsonl`, plot them at the end.

    One JSON object per line, `kind` says which:
    `{"kind": "train", "step", "epoch", "tokens", "time_s", "train/loss", "train/lr"}`
    per optimizer step (every `every_n_steps`), `{"kind": "val", "step", ...,
    "val/ppl", "val/loss"}` per validation, and at the end of fitting
    `{"kind": "best", "monitor", "score", "checkpoint"}` from the checkpoint
    callback. `step` counts optimizer steps done (the checkpoint's
    `global_step`); `tokens` counts input tokens of all processes so far.

    Losses stay on the device until the next validation or the end of fitting,
    which read them back in one transfer: no per-step sync. Tokens come from
    batch shapes. Throughput (`tokens_per_s`) excludes validation and sampling
    time. The token count and training time travel in checkpoints, so a resumed
    run continues them; a run resumed in the same folder appends to its
    record (records past the resumed step are superseded when read).
    """

    def __init__(
        self, dirpath: str, every_n_steps: int = 1, plot: bool = True, window: int = 50
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.plot = plot
        self.tokens_seen = 0
        self.train_time_s = 0.0
        self.fit_started: float | None = None
        self._clock: float | None = None  # start of the current stretch of training
        self._lr: float | None = None
        self._step_losses: list[Tensor] = []
        self._pending: list[tuple[dict[str, Any], Tensor | None]] = []
        self._last_step = -1
        self._recent: deque[tuple[float, int, int]] = deque(maxlen=max(2, window))

    @property
    def metrics_path(self) -> Path:
        return self.dirpath / METRICS_FILE

    @property
    def plot_path(self) -> Path:
        return self.dirpath / PLOT_FILE

    # -- state carried by checkpoints -----------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "train_time_s": self._train_time()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))

    # -- clocks ---------------------------------------------------------------

    def _train_time(self) -> float:
        running = 0.0 if self._clock is None else time.perf_counter() - self._clock
        return self.train_time_s + running

    def _pause_clock(self) -> None:
        if self._clock is not None:
            self.train_time_s += time.perf_counter() - self._clock
            self._clock = None

    def _start_clock(self) -> None:
        self._clock = time.perf_counter()
        self._recent.clear()  # the recent rate measures training only

    def recent_tokens_per_s(self) -> float | None:
        """Tokens per second over the last `window` steps, None until two steps are seen."""
        if len(self._recent) < 2:
            return None
        (t0, tokens0, _), (t1, tokens1, _) = self._recent[0], self._recent[-1]
        return (tokens1 - tokens0) / (t1 - t0) if t1 > t0 else None

    def recent_seconds_per_step(self) -> float | None:
        if len(self._recent) < 2:
            return None
        (t0, _, step0), (t1, _, step1) = self._recent[0], self._recent[-1]
        return (t1 - t0) / (step1 - step0) if step1 > step0 else None

    # -- hooks ----------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_started = time.perf_counter()
        self._last_step = trainer.global_step
        if trainer.is_global_zero and trainer.ckpt_path is None:
            # A fresh run starts a fresh record; a resumed one appends to it.
            self.metrics_path.unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._start_clock()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._clock is None:  # back from validation (and sampling)
            self._start_clock()
        if trainer.optimizers:
            # The LR this step uses: the scheduler steps before on_train_batch_end.
            self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.tokens_seen += _batch_tokens(batch) * trainer.world_size
        if not trainer.is_global_zero:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # Lightning divides the loss by accumulate_grad_batches; undo it.
            self._step_losses.append(loss.detach().float() * trainer.accumulate_grad_batches)
        step = trainer.global_step
        if step == self._last_step:  # accumulating: the optimizer has not stepped yet
            return
        self._last_step = step
        self._recent.append((time.perf_counter(), self.tokens_seen, step))
        if step % self.every_n_steps == 0:
            record = {
                "kind": "train",
                "step": step,
                "epoch": trainer.current_epoch,
                "tokens": self.tokens_seen,
                "time_s": round(self._train_time(), 3),
                "train/lr": self._lr,
            }
            loss_mean = torch.stack(self._step_losses).mean() if self._step_losses else None
            self._pending.append((record, loss_mean))
        self._step_losses = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _fitting(trainer):
            self._pause_clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _fitting(trainer):
            return
        if trainer.is_global_zero:
            record = {
                "kind": "val",
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "tokens": self.tokens_seen,
                "time_s": round(self._train_time(), 3),
            }
            for name, value in trainer.callback_metrics.items():
                if name.startswith("val/"):
                    record[name] = float(value)  # one sync per validation
            self._pending.append((record, None))
            self._flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause_clock()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause_clock()
        if not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)
        if score is not None and getattr(checkpoint, "monitor", None):
            record = {
                "kind": "best",
                "monitor": checkpoint.monitor,
                "score": float(score),
                "checkpoint": checkpoint.best_model_path,
            }
            self._pending.append((record, None))
        self._flush()
        if self.plot and self.metrics_path.is_file():
            from lmlab.plot import load_curves, plot_curves

            try:
                plot_curves([load_curves(self.dirpath)], self.plot_path)
            except Exception as error:  # a figure is not worth losing a finished run over
                rank_zero_warn(f"could not draw {self.plot_path}: {error!r}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero:
            self._flush()  # keep what was recorded before an interrupt or a crash

    def _flush(self) -> None:
        """Read the pending losses back in one transfer and append every record to the file."""
        if not self._pending:
            return
        losses = [loss for _, loss in self._pending if loss is not None]
        values = iter(torch.stack(losses).cpu().tolist() if losses else [])
        lines = []
        for record, loss in self._pending:
            if loss is not None:
                record["train/loss"] = next(values)
            lines.append(json.dumps(record) + "\n")
        self._pending = []
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.writelines(lines)


class ModelFiles(Callback):
    """`vocab.json` and `model_config.json` in `dirpath`, for people and tools without torch.

    Written when fitting starts, after `ModelCheckpoint` has looked at its folder: written
    earlier, they made Lightning warn that a fresh run's checkpoint folder is not empty.
    """

    def __init__(self, dirpath: str | Path, vocab: Vocabulary, model_config: dict) -> None:
        self.dirpath = Path(dirpath)
        self.vocab = vocab
        self.model_config = model_config

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            self.vocab.save(self.dirpath / "vocab.json")
            (self.dirpath / "model_config.json").write_text(json.dumps(self.model_config, indent=2))


# ---------------------------------------------------------------------------
# Progress and parameters.


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _rate(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar showing loss, val ppl, step/total, tokens/s and the ETA.

    Tokens/s and the ETA (of the remaining training steps, validation not
    counted) come from the trainer's `RunRecorder`, averaged over its recent
    steps; without one they are left out.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        shown: dict[str, Any] = {}
        if "train/loss" in items:
            shown["loss"] = f"{items.pop('train/loss'):.3f}"
        if "val/ppl" in items:
            shown["val ppl"] = f"{items.pop('val/ppl'):.2f}"
        shown.update(items)
        total = trainer.estimated_stepping_batches
        has_total = isinstance(total, int) or float(total) < float("inf")
        shown["step"] = f"{trainer.global_step}/{int(total)}" if has_total else trainer.global_step
        recorder = find_callback(trainer, RunRecorder)
        if recorder is not None:
            rate = recorder.recent_tokens_per_s()
            if rate is not None:
                shown["tok/s"] = _rate(rate)
            per_step = recorder.recent_seconds_per_step()
            if per_step is not None and has_total:
                shown["eta"] = _duration(max(0, int(total) - trainer.global_step) * per_step)
        return shown


def progress_bar(enabled: bool = True) -> ProgressBar | None:
    """The progress bar, or None when `trainer.enable_progress_bar` is off (Lightning refuses both)."""
    return ProgressBar() if enabled else None


class ParameterSummary(ModelSummary):
    """At the start of fitting, a Rich table of the model's parameters per part.

    Replaces Lightning's layer summary (a `ModelSummary` subclass, so Lightning
    adds no other). Expects the LightningModule to hold the network as `.model`.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from lmlab.summary import parameter_table

        Console().print(parameter_table(getattr(pl_module, "model", pl_module)))


def parameter_summary(enabled: bool = True) -> ParameterSummary | None:
    """The parameter table, or None when `trainer.enable_model_summary` is off."""
    return ParameterSummary() if enabled else None


# ---------------------------------------------------------------------------
# Sample text during training.


def _markdown_line(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


class SampleText(Callback):
    """At each validation, continue a few fixed prompts with the current model.

    Each prompt gets a greedy continuation and a sampled one (temperature,
    top-k, top-p), decoded with the KV cache. Sampling draws from its own
    `torch.Generator` seeded with `seed` at every validation, so the samples
    differ between validations only because the model did; the global RNG
    state is saved and restored around decoding, so training is undisturbed.
    Prompts are words of the model's vocabulary (`pl_module.vocab_words`),
    read after an `<eos>` as if a new sentence started; unknown words become
    `<unk>`. Entries go to `samples.md` (one per validation, headed with the
    step and val/ppl) and, as text, to TensorBoard and W&B loggers. Global
    rank 0 only.
    """

    def __init__(
        self,
        dirpath: str,
        prompts: Sequence[str] = ("the company said",),
        max_new_tokens: int = 20,
        temperature: float = 0.8,
        top_k: int | None = 40,
        top_p: float | None = None,
        seed: int = 0,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 for the sampled continuation, got {temperature}; "
                "the greedy one is always shown"
            )
        self.dirpath = Path(dirpath)
        self.prompts = [str(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self._vocab: Vocabulary | None = None

    @property
    def samples_path(self) -> Path:
        return self.dirpath / SAMPLES_FILE

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.ckpt_path is None:
            self.samples_path.unlink(missing_ok=True)

    def continuations(self, pl_module: L.LightningModule) -> list[dict[str, str]]:
        """For each prompt: {"prompt", "greedy", "sampled"} (the new words only)."""
        if self._vocab is None:
            self._vocab = Vocabulary(pl_module.vocab_words)
        vocab, model, device = self._vocab, pl_module.model, pl_module.device
        rows = []
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            generator = torch.Generator(device=device).manual_seed(self.seed)
            for prompt in self.prompts:
                ids = [vocab.eos_id, *vocab.encode(prompt.split())]
                prompt_ids = torch.tensor([ids], device=device)
                greedy = generate(model, prompt_ids, self.max_new_tokens, temperature=0.0)
                sampled = generate(
                    model,
                    prompt_ids,
                    self.max_new_tokens,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    generator=generator,
                )
                rows.append(
                    {
                        "prompt": prompt,
                        "greedy": vocab.decode(greedy[0, len(ids) :].tolist()),
                        "sampled": vocab.decode(sampled[0, len(ids) :].tolist()),
                    }
                )
        return rows

    def _settings(self) -> str:
        parts = [f"temperature {self.temperature}"]
        if self.top_k is not None:
            parts.append(f"top-k {self.top_k}")
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p}")
        return ", ".join([*parts, f"seed {self.seed}"])

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _fitting(trainer) or not trainer.is_global_zero:
            return
        rows = self.continuations(pl_module)
        step = trainer.global_step
        ppl = trainer.callback_metrics.get("val/ppl")
        heading = f"step {step}" + ("" if ppl is None else f" · val/ppl {float(ppl):.2f}")
        body = [f"## {heading}", ""]
        for row in rows:
            body.append(f"**{_markdown_line(row['prompt'])}**")
            body.append("")
            body.append(f"- greedy: {_markdown_line(row['greedy'])}")
            body.append(f"- sampled: {_markdown_line(row['sampled'])}")
            body.append("")
        entry = "\n".join(body)

        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.samples_path.is_file()
        with self.samples_path.open("a") as f:
            if new_file:
                f.write(f"# Samples\n\nGreedy, and sampled with {self._settings()}.\n\n")
            f.write(entry + "\n")

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", entry, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_text(
                    key="samples",
                    columns=["step", "prompt", "greedy", "sampled"],
                    data=[[step, r["prompt"], r["greedy"], r["sampled"]] for r in rows],
                )
