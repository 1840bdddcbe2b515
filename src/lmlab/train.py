"""The steps of a training run: seed, data, model, trainer, fit, test, summary.

`python train.py [overrides]` and `lmlab-train [overrides]` run `main` as a
Hydra app (see `lmlab.cli`). See README.md.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from lmlab import onednn
from lmlab.callbacks import ModelFiles, find_callback
from lmlab.checkpoint import checkpoint_metadata
from lmlab.compilation import AUTO, CompileWherePays
from lmlab.config import check_train_config, instantiate_each
from lmlab.distributed import (
    SameConfigOnAllRanks,
    check_launched_world_size,
    report_lost_processes,
)
from lmlab.failsafe import (
    AtomicCheckpointIO,
    prepare_checkpoint_dirs,
    run_callbacks,
    stop_on_signals,
)
from lmlab.finetune import freeze, initialise_from
from lmlab.lit_module import LanguageModel
from lmlab.loggers import log_config
from lmlab.precision import Choice, choose_precision
from lmlab.recorder import RunRecorder
from lmlab.result import record_result
from lmlab.resume import check_resumable, restores_stored_config_if_refused
from lmlab.samples import SampleText
from lmlab.summary import SUMMARY_FILE, RunSummary

log = logging.getLogger(__name__)


@restores_stored_config_if_refused  # resume= with a refused override keeps the run resumable
@record_result  # result.json; in a sweep, a failed job is recorded and the sweep goes on
@report_lost_processes  # another process of the run is gone: one line, not a traceback
@stop_on_signals
def main(cfg: DictConfig) -> dict:
    check_train_config(cfg)
    check_launched_world_size(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)

    tokenizer_spec = instantiate(cfg.tokenizer) if cfg.get("tokenizer") else None
    datamodule = instantiate(cfg.data, tokenizer=tokenizer_spec)
    datamodule.prepare_data()
    tokenizer = datamodule.tokenizer

    model_config = instantiate(cfg.model, vocab_size=len(tokenizer))
    if cfg.get("resume"):
        check_resumable(cfg.resume, model_config, tokenizer.words)
    module = LanguageModel(
        model_config,
        tokenizer.words,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        compile=cfg.compile is True,  # auto: CompileWherePays decides when fitting starts
        carry_state=cfg.data.get("order") == "contiguous",
        tokenizer=tokenizer.to_dict(),
    )
    if cfg.get("init_from") and not cfg.get("resume"):  # a resumed run has its own weights
        log.info(
            initialise_from(module.model, tokenizer, str(cfg.init_from)).describe(cfg.init_from)
        )
    frozen = freeze(module.model, list(cfg.finetune.freeze)) if cfg.get("finetune") else []
    if frozen:
        log.info("finetune.freeze: %d parameter tensors frozen: %s", len(frozen), ", ".join(frozen))
    output_dir = Path(cfg.paths.output_dir)
    precision = choose_precision(
        cfg.trainer.precision,
        cfg.trainer.accelerator,
        model_config.n_embd,
        datamodule.cache_root,
        needs_native_bf16=module.model.needs_native_bf16,
    )
    log.info("precision %s: %s", precision.precision, precision.reason)
    log.info("float32 matmuls of the linear layers and the fused loss: %s", onednn.choice())
    plugins = [*instantiate(cfg.trainer.get("plugins") or []), AtomicCheckpointIO()]
    trainer = instantiate(
        cfg.trainer,
        precision=precision.precision,
        callbacks=[
            *instantiate_each(cfg, "callbacks"),
            *run_callbacks(plugins),
            *([CompileWherePays(datamodule.cache_root)] if cfg.compile == AUTO else []),
            SameConfigOnAllRanks(cfg),
            ModelFiles(
                output_dir / "checkpoints",
                checkpoint_metadata(model_config, tokenizer.words, tokenizer.to_dict()),
            ),
        ],
        logger=instantiate_each(cfg, "logger") or False,
        plugins=plugins,
    )
    log_config(trainer.loggers, cfg)
    if trainer.is_global_zero:
        prepare_checkpoint_dirs(trainer.checkpoint_callbacks)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume"))

    # The first ModelCheckpoint, not Lightning's `trainer.checkpoint_callback`, the first
    # Checkpoint of any kind: with callbacks.model_checkpoint and periodic_checkpoint
    # both null, that was GracefulStop, which has no checkpoint paths.
    checkpoint = find_callback(trainer, ModelCheckpoint)
    best_path = checkpoint.best_model_path if checkpoint else ""
    # before testing: trainer.test(ckpt_path=best) gives the callbacks best.ckpt's state
    # back, and best.ckpt was written before the last last.ckpt
    last_path = checkpoint.last_model_path if checkpoint else ""
    test_ppl = math.nan
    if cfg.test:
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None)
        test_ppl = results[0]["test/ppl"] if results else math.nan

    # None when no validation ran (trainer.limit_val_batches=0, or
    # callbacks.final_validation=null and trainer.max_steps before the first one)
    best_ppl = (
        float(checkpoint.best_model_score)
        if checkpoint and checkpoint.best_model_score is not None
        else None
    )
    if trainer.is_global_zero:
        summary = summarize(trainer, output_dir, test_ppl, precision, last_path)
        summary.write(output_dir / SUMMARY_FILE)
        summary.print()
    return {
        "best_val_ppl": best_ppl,
        "test_ppl": float(test_ppl),
        "steps": trainer.global_step,
        "best_checkpoint": best_path,
    }


def summarize(
    trainer: L.Trainer, output_dir: Path, test_ppl: float, precision: Choice, last_path: str
) -> RunSummary:
    """The run's summary from what its trainer, checkpoint callback and record measured."""
    checkpoint = find_callback(trainer, ModelCheckpoint)
    recorder = find_callback(trainer, RunRecorder)
    sampler = find_callback(trainer, SampleText)
    figures = {}
    if recorder is not None:
        figures = {
            "tokens_seen": recorder.tokens_seen,
            "train_time_s": recorder.train_time_s,
            "wall_time_s": None
            if recorder.fit_started is None
            else time.perf_counter() - recorder.fit_started,
            "record_dir": recorder.dirpath,
            "curves": recorder.plot_path,
        }
    if sampler is not None:
        figures["samples"] = sampler.samples_path
        if sampler.prompts:
            figures["prompt"] = sampler.prompts[0]
    return RunSummary.collect(
        output_dir,
        steps=trainer.global_step,
        epochs=trainer.current_epoch,
        test_ppl=test_ppl,
        precision=f"{precision.precision} ({precision.reason})",
        model=trainer.lightning_module.model,
        best_val_ppl=getattr(checkpoint, "best_model_score", None),
        best_checkpoint=getattr(checkpoint, "best_model_path", None),
        last_checkpoint=last_path,
        **figures,
    )
