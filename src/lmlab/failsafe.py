"""Runs that stop safely: atomic checkpoints, graceful signals, a guard against divergence.

- `AtomicCheckpointIO` writes each checkpoint to a temporary file beside it,
  checks that it loads, and only then renames it into place: a crash (even
  SIGKILL) mid-save leaves the previous checkpoint intact. It never writes
  non-finite weights.
- `GracefulStop`: SIGTERM or SIGINT lets the current optimizer step finish,
  writes `last.ckpt` and exits with 128 + the signal (143, 130), never 0. A
  second signal stops at once. Under SLURM with `trainer=slurm`, SIGUSR1 (sent
  before the time limit) does the same with an `hpc_ckpt_N.ckpt` and requeues
  the job (`scontrol requeue`), which continues from it in the same folder.
- `NonFiniteGuard` stops the run on the first non-finite training loss,
  naming the step, before any checkpoint of that state is written.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lmlab.atomic import TMP_SUFFIX, stale_temporaries, write_atomically
from lmlab.errors import UserError
from lmlab.resume import ResumeState

log = logging.getLogger(__name__)

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- checkpoint files ---------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` through a verified temporary file in the checkpoint's own folder."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        refuse_non_finite(checkpoint, path)
        try:
            write_atomically(
                path,
                lambda f: torch.save(checkpoint, f),
                # mmap: checks the archive and its pickle without reading every tensor
                verify=lambda tmp: torch.load(
                    tmp, map_location="cpu", weights_only=True, mmap=True
                ),
            )
        except (OSError, RuntimeError) as error:  # disk full, folder gone, ...
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise UserError(
                f"could not write checkpoint {path}: {reason}; the previous one is intact"
            ) from None
        if not path.is_file():
            raise OSError(f"checkpoint {path} is missing right after it was written")


def refuse_non_finite(checkpoint: dict[str, Any], path: Path) -> None:
    """Raise instead of writing weights that are NaN or infinite."""
    for name, value in checkpoint.get("state_dict", {}).items():
        if isinstance(value, Tensor) and value.is_floating_point() and not all_finite(value):
            step = checkpoint.get("global_step", "?")
            raise UserError(
                f"weights are not finite at step {step} ({name}); {path} was not written"
            )


def all_finite(value: Tensor) -> bool:
    """Whether no element is NaN or infinite.

    A sum is finite only where every element is (NaN and infinities carry through it), and
    it makes no temporary: `isfinite()` of a 250,000 x 256 embedding makes 430 MiB of them,
    a third more than the whole `small` model at that vocabulary. A sum that overflows
    from finite elements is checked element by element.
    """
    return bool(value.sum().isfinite()) or bool(value.isfinite().all())


def prepare_checkpoint_dirs(callbacks: Iterable[Any]) -> None:
    """Create each checkpoint folder, prove it writable, and remove stale temporary files.

    Runs before training, so a folder that cannot take a checkpoint stops the
    run at once instead of after hours of training.
    """
    for callback in callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath is None:
            continue
        folder = Path(dirpath)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=TMP_SUFFIX)
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            reason = error.strerror or error
            raise UserError(f"checkpoint folder {folder} is not writable: {reason}") from None
        for stale in stale_temporaries(folder, "*.ckpt"):
            log.info("removing %s, left by an interrupted checkpoint save", stale)
            stale.unlink(missing_ok=True)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where `last.ckpt` goes: the folder of the first ModelCheckpoint that keeps one."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
            return Path(callback.dirpath) / name
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


# -- signals ------------------------------------------------------------------


class Stopped(SystemExit):
    """Raised to end the process after a stop signal: exit status 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class StopRequest:
    """Remembers the first SIGTERM or SIGINT; a second one ends the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self, *extra: int) -> None:
        for signum in (*STOP_SIGNALS, *extra):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"{name} received: finishing this step, then writing a checkpoint "
            f"({name} again stops at once)",
            file=sys.stderr,
            flush=True,
        )


STOP = StopRequest()  # signals reach the process, so one request per process


def stop_on_signals(main: Callable[..., T]) -> Callable[..., T]:
    """Run `main` with SIGTERM and SIGINT turned into a request to stop at a step boundary.

    Training answers the request itself (see `GracefulStop`); a request that
    arrives outside training still ends the process with 128 + the signal,
    after `main` returns, never with 0.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        STOP.install()
        try:
            result = main(*args, **kwargs)
        except SIGTERMException:  # Lightning's own SIGTERM exit says 0
            raise Stopped(signal.SIGTERM) from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if STOP.signum is not None:
            raise Stopped(STOP.signum)
        return result

    return wrapper


class GracefulStop(Checkpoint):
    """After a stop signal: finish the step, write `last.ckpt`, exit with 128 + signal.

    Lightning's own SIGTERM handling would abort a validation midway and exit
    with status 0 and no checkpoint, so this replaces it while training runs.
    A `Checkpoint` subclass, so Lightning runs it after the ModelCheckpoints:
    the state it saves includes theirs.
    """

    # What code reading `trainer.checkpoint_callback` expects, should this be the
    # first Checkpoint (no ModelCheckpoint configured).
    best_model_path = ""
    best_model_score = None

    def __init__(self, requeue: SLURMEnvironment | None = None) -> None:
        # SLURM's auto-requeue (trainer=slurm): its signal stops here too, at a step
        # boundary. Lightning's own handler saves at whatever point the signal lands,
        # even mid-step, and lets training go on until SLURM kills the job.
        self.requeue = requeue if requeue is not None and requeue.auto_requeue else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning has installed its handlers for this fit
        if self.requeue is not None and SLURMEnvironment.detect():
            STOP.install(self.requeue.requeue_signal)
        else:
            STOP.install()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        signum = self._requested(trainer)
        if signum is not None and not validation_follows(trainer):
            self._stop(trainer, signum)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            signum = self._requested(trainer)
            if signum is not None:
                self._stop(trainer, signum)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal during the final validation: training is complete and saved.
        if STOP.signum is not None:
            raise Stopped(STOP.signum)

    def _requested(self, trainer: L.Trainer) -> int | None:
        signum = STOP.signum
        if trainer.world_size > 1:  # every rank stops after the same step
            stop = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
            signum = (signum or signal.SIGTERM) if stop else None
        return signum

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        requeue = self.requeue is not None and signum == self.requeue.requeue_signal
        path = hpc_checkpoint_path(trainer) if requeue else last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            then = requeue_slurm_job() if requeue else "continue with resume=RUN_DIR"
            print(
                f"stopped after step {trainer.global_step}; checkpoint {path}; {then}",
                file=sys.stderr,
                flush=True,
            )
        raise Stopped(signum)


HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def hpc_checkpoint_path(trainer: L.Trainer) -> Path:
    """The next `hpc_ckpt_N.ckpt` in the run folder: where Lightning resumes a requeued job from."""
    folder = Path(trainer.default_root_dir)
    numbers = [
        int(m.group(1))
        for p in folder.glob("hpc_ckpt_*.ckpt")
        if (m := HPC_CHECKPOINT.fullmatch(p.name))
    ]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_slurm_job() -> str:
    """`scontrol requeue` this SLURM job (an array task by its array id); what happened, in words."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if array_job
        else os.environ["SLURM_JOB_ID"]
    )
    try:
        code = subprocess.run(["scontrol", "requeue", job], timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue SLURM job {job} ({error}); resubmit it"
    if code != 0:
        return f"scontrol requeue {job} failed (exit code {code}); resubmit the job"
    return f"requeued SLURM job {job}: it continues from this checkpoint in this folder"


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint(every_n_train_steps=N)` whose saves never come right before a validation.

    Lightning (2.6) resumes a checkpoint written at the end of a training
    batch as if the validation due after that batch had already run, and
    skips it. A save due on such a batch waits for the end of that validation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._after_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and validation_follows(trainer):
            self._after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        self._after_validation = False


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


# -- divergence -----------------------------------------------------------------


class NonFiniteGuard(L.Callback):
    """Stop on the first non-finite training loss, before that state is checkpointed.

    On CPU each loss is checked right away. On a CUDA device the loss is
    copied into pinned host memory without waiting and checked one step
    later, so training never waits for it; before any checkpoint is written
    the pending loss is checked at once, so a diverged state never reaches
    disk (AtomicCheckpointIO also refuses non-finite weights). With several
    processes the decision is shared, so all of them stop at the same step.
    """

    def __init__(self) -> None:
        self._pending: tuple[int, Tensor, Any] | None = None  # step, host copy, copy-done event
        self._host: Tensor | None = None  # pinned, so the copy does not wait

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return
        self._check_pending(trainer)
        loss = loss.detach().float()
        if loss.device.type != "cuda":
            self._pending = (trainer.global_step, loss.cpu(), None)
            self._check_pending(trainer)
            return
        if self._host is None:
            self._host = torch.empty((), pin_memory=True)
        self._host.copy_(loss, non_blocking=True)  # the previous value was read above
        event = torch.cuda.Event()
        event.record()
        self._pending = (trainer.global_step, self._host, event)

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        self._check_pending(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_pending(trainer)

    def _check_pending(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        step, loss, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        value = float(loss)
        diverged = not math.isfinite(value)
        if trainer.world_size > 1:
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if not diverged:
            return
        last = last_checkpoint_path(trainer)
        kept = (
            f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
        )
        shown = value if not math.isfinite(value) else "not finite in another process"
        raise UserError(
            f"training loss is {shown} at step {step}; stopped before that state was saved "
            f"({kept}); lower optimizer.lr and train again"
        )


def run_callbacks(plugins: Iterable[Any] = ()) -> list[L.Callback]:
    """The callbacks every training run gets, besides those in the config.

    `plugins` are the trainer's: a SLURMEnvironment with auto_requeue among them
    makes its signal a graceful stop that requeues the job.
    """
    requeue = next((p for p in plugins if isinstance(p, SLURMEnvironment)), None)
    # order matters within a step: check, then stop (the config's callbacks come first)
    return [NonFiniteGuard(), ResumeState(), GracefulStop(requeue)]
