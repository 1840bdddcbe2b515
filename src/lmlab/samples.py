"""`SampleText`: what the model writes, at each validation, into `samples.md` and the loggers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lmlab.checks import is_int, is_number
from lmlab.decoding import check_decoding_args, generate
from lmlab.tokenizers import Tokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.md"


def _fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == "fit" and not trainer.sanity_checking


def _markdown_line(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


class SampleText(Callback):
    """At each validation, continue a few fixed prompts with the current model.

    Each prompt gets a greedy continuation and a sampled one (temperature,
    top-k, top-p), decoded with the KV cache. Sampling draws from its own
    `torch.Generator` seeded with `seed` at every validation, so the samples
    differ between validations only because the model did; the global RNG
    state is saved and restored around decoding, so training is undisturbed.
    Prompts are encoded with the model's tokenizer (`pl_module.tokenizer` over
    `pl_module.vocab_words`), read after an `<eos>` as if a new sentence
    started; what the tokenizer does not know becomes `<unk>`. Entries go to `samples.md` (one per validation, headed with the
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
        if not (is_int(max_new_tokens) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not (is_number(temperature) and temperature > 0):
            raise ValueError(
                f"temperature must be > 0 for the sampled continuation, got {temperature!r}; "
                "the greedy one is always shown"
            )
        # here, not at the first validation, where a bad value would end the run after
        # its first epoch of training, before any checkpoint
        check_decoding_args(temperature=temperature, top_k=top_k, top_p=top_p)
        self.dirpath = Path(dirpath)
        self.prompts = [str(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self._said_sharded = False
        self._vocab: Tokenizer | None = None

    @property
    def samples_path(self) -> Path:
        return self.dirpath / SAMPLES_FILE

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.ckpt_path is None:
            self.samples_path.unlink(missing_ok=True)

    def continuations(self, pl_module: L.LightningModule) -> list[dict[str, str]]:
        """For each prompt: {"prompt", "greedy", "sampled"} (the new words only)."""
        if self._vocab is None:
            self._vocab = tokenizer_from_dict(pl_module.tokenizer, pl_module.vocab_words)
        vocab, model, device = self._vocab, pl_module.model, pl_module.device
        rows = []
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            generator = torch.Generator(device=device).manual_seed(self.seed)
            for prompt in self.prompts:
                ids = [vocab.eos_id, *vocab.encode(prompt)]
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
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            # rank 0 alone cannot run a sharded model: each block gathers its weights
            # from every rank, which would wait for ranks that are not decoding
            if not self._said_sharded:
                log.info("no sample text: the model is sharded (FSDP)")
                self._said_sharded = True
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
