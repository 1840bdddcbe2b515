"""Several processes per run under Hydra: one run folder, one config, sweeps that still work.

Single runs: Lightning starts the other processes by re-running the command
with the run folder appended (`hydra.run.dir=...`, `hydra.output_subdir=null`),
so every rank writes into the one folder. Sweeps: re-running a `-m` command
would start a second sweep in every child (Lightning #11300, Hydra #2070), and
a sweep process that has been rank 0 of one job cannot cleanly be rank 0 of
the next. So a sweep job that needs several processes started by Lightning
runs `train.py` afresh, in single-run mode, in its job folder, with exactly the
job's overrides, and the sweep reads back its `result.json`. Processes started
by SLURM (hydra/launcher=slurm) or torchrun are used as they are.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd, instantiate, to_absolute_path
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lmlab.checks import is_int
from lmlab.errors import RunInterrupted, UserError
from lmlab.resume import locate
from lmlab.run_folder import SWEEP_DIR_ENV

log = logging.getLogger(__name__)

T = TypeVar("T")

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
# hydra/launcher=local_parallel: jobs side by side in joblib's worker processes.
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
# Hydra settings a job run in fresh processes keeps from the sweep's command line.
FORWARDED_HYDRA_OVERRIDES = (
    "hydra.job.chdir",
    "hydra.job.env_set",
    "hydra.verbose",
    "hydra/job_logging",
    "hydra/hydra_logging",
    "hydra.job_logging",
    "hydra.hydra_logging",
)


class SweepSetupError(UserError):
    """A sweep whose jobs cannot get their processes this way; stops the sweep before training."""


def _process_launch(trainer_cfg: DictConfig) -> str:
    """'single', 'lightning' (Lightning would start the other processes) or 'external'."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the probe would repeat "GPU available: ..." lines
    try:
        # a throwaway trainer for its world size; precision=auto is resolved by train.py
        trainer = instantiate(
            trainer_cfg,
            precision="32-true",
            logger=False,
            callbacks=[],
            enable_checkpointing=False,
        )
    except Exception:
        return "single"  # the job itself reports the problem, in its own folder
    finally:
        quiet.setLevel(level)
    if trainer.world_size == 1:
        return "single"
    external = trainer.strategy.cluster_environment.creates_processes_externally
    return "external" if external else "lightning"


def sweep_job_needs_fresh_processes(trainer_cfg: DictConfig) -> bool:
    """In a sweep job: whether to run it as a fresh `train.py` (see the module docstring).

    Raises SweepSetupError for combinations that cannot work, before any training.
    """
    launch = _process_launch(trainer_cfg)
    basic = HydraConfig.get().launcher.get("_target_") == BASIC_LAUNCHER
    if launch == "lightning" and not basic:
        raise SweepSetupError(
            f"trainer.devices={trainer_cfg.get('devices')} in a sweep needs Hydra's basic launcher "
            "(Lightning starts the processes), or hydra/launcher=slurm, whose tasks_per_node "
            "starts one process per device"
        )
    if launch == "external" and basic:
        raise SweepSetupError(
            "these processes were started by torchrun or srun, so each would run the whole "
            "sweep: run `python train.py -m ...` (each job starts its own processes) "
            "or use hydra/launcher=slurm"
        )
    return launch == "lightning"


def share_cores_with_parallel_jobs() -> int | None:
    """In a job of a parallel sweep (hydra/launcher=local_parallel): take this job's share.

    n_jobs jobs run at once, so each gets cores / n_jobs threads instead of
    every core (which would make them fight over the cores). Returns the
    thread count set, or None outside such a sweep.
    """
    launcher = HydraConfig.get().launcher
    if launcher.get("_target_") != JOBLIB_LAUNCHER:
        return None
    cores = len(os.sched_getaffinity(0))
    n_jobs = int(launcher.get("n_jobs") or -1)
    at_once = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)  # joblib: -1 is every core
    threads = max(cores // at_once, 1)
    torch.set_num_threads(threads)
    log.info(
        "parallel sweep: %d jobs at once on %d cores, %d threads per job", at_once, cores, threads
    )
    return threads


def _script_command() -> list[str]:
    import __main__

    if getattr(__main__, "__spec__", None) is not None and __main__.__spec__ is not None:
        return [sys.executable, "-m", __main__.__spec__.name]
    return [sys.executable, to_absolute_path(sys.argv[0])]


def _config_flags() -> list[str]:
    """The --config-path/-name/-dir flags of this process's command line (Hydra's spelling)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    parser.add_argument("--config-dir", "-cd")
    args, _ = parser.parse_known_args(sys.argv[1:])
    flags = []
    for flag, value in (
        ("--config-path", args.config_path),
        ("--config-name", args.config_name),
        ("--config-dir", args.config_dir),
    ):
        if value is not None:
            flags += [flag, value]
    return flags


def job_command(output_dir: Path) -> list[str]:
    """The single-run command line of the current sweep job, writing into `output_dir`."""
    hydra_cfg = HydraConfig.get()
    forwarded = [
        o
        for o in hydra_cfg.overrides.hydra
        if o.lstrip("+~").split("=", 1)[0].startswith(FORWARDED_HYDRA_OVERRIDES)
    ]
    return [
        *_script_command(),
        *_config_flags(),
        *hydra_cfg.overrides.task,
        *forwarded,
        f'hydra.run.dir="{output_dir.resolve()}"',
        "hydra.output_subdir=null",  # the sweep wrote this job's .hydra already
        "hydra.mode=RUN",
    ]


def run_in_fresh_processes(output_dir: Path) -> int:
    """Run the current sweep job as a single `train.py` run; return its exit code."""
    command = job_command(output_dir)
    log.info("job needs several processes: running it as a single run in %s", output_dir)
    env = {**os.environ, SWEEP_DIR_ENV: str(Path(HydraConfig.get().sweep.dir).resolve())}
    return subprocess.run(command, cwd=get_original_cwd(), env=env).returncode


def check_launched_world_size(trainer_cfg: DictConfig) -> None:
    """Stop with one line when torchrun or srun started another number of processes than
    `trainer.num_nodes` x `trainer.devices`.

    Runs before the process group forms: Lightning would raise a traceback there,
    and a process that stops while the others wait for it leaves them hanging.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        launched = TorchElasticEnvironment().world_size()
        source = f"torchrun started {launched} (WORLD_SIZE={launched})"
        fix = "--nnodes x --nproc-per-node"
    elif SLURMEnvironment.detect():
        launched = SLURMEnvironment().world_size()
        source = f"SLURM started {launched} (SLURM_NTASKS={launched})"
        fix = "--nodes x --ntasks-per-node"
    else:
        return
    devices, nodes = trainer_cfg.get("devices"), trainer_cfg.get("num_nodes", 1)
    if not (is_int(devices) and is_int(nodes)):
        return  # devices=auto: Lightning counts them, and checks
    if devices * nodes != launched:
        raise UserError(
            f"trainer.num_nodes={nodes} x trainer.devices={devices} = {devices * nodes} "
            f"processes, but {source}; make them match {fix}"
        )


class SameConfigOnAllRanks(L.Callback):
    """Stops a run whose processes composed different configs (or different run folders).

    Compares a hash of the resolved config across ranks when fitting starts, so
    a launcher that gave the processes different overrides fails loudly.
    """

    def __init__(self, cfg: DictConfig) -> None:
        text = OmegaConf.to_yaml(cfg, resolve=True)
        self.digest = hashlib.sha256(text.encode()).hexdigest()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1 or stage != "fit":
            return
        mine = torch.tensor([int(self.digest[:12], 16)], device=trainer.strategy.root_device)
        everyone = trainer.strategy.all_gather(mine).flatten()
        if bool((everyone != mine).any()):
            raise RuntimeError(
                f"the {trainer.world_size} processes of this run composed different configs "
                f"(rank {trainer.global_rank} has sha256 {self.digest[:12]})"
            )
        if trainer.is_global_zero:
            log.info(
                "config identical on all %d processes (sha256 %s)",
                trainer.world_size,
                self.digest[:12],
            )


# What gloo and NCCL say when another process of the run is gone (killed, crashed, its
# node down) or has stopped answering for longer than trainer.strategy.timeout.
LOST_PROCESS = re.compile(
    r"Connection (?:closed|reset) by peer(?: \[[^\]]*\]:\d+)?"
    r"|Timed out waiting \d+ms for \w+ operation to complete"
    r"|Watchdog caught collective operation timeout"
    r"|NCCL communicator was aborted"
)


def _lost_process_reason(error: BaseException | None) -> str | None:
    """The words of `error` (or what caused it) that say another process is gone, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and (match := LOST_PROCESS.search(str(error))):
            return match.group(0).strip()
        error = error.__cause__ or error.__context__
    return None


def report_lost_processes(main: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Run `main(cfg)`; when another process of the run is lost, stop with one line saying so.

    Without this a survivor prints a long traceback from deep inside a
    collective. The line names the lost rank (with two processes it is the
    other one; with more, gloo and NCCL do not say which), the last checkpoint
    and the command that continues the run.
    """

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> T:
        try:
            return main(cfg)
        except Exception as error:
            reason = _lost_process_reason(error)
            if reason is None:
                raise
            raise RunInterrupted(_lost_process_message(cfg, reason)) from None

    return wrapper


def _lost_process_message(cfg: DictConfig, reason: str) -> str:
    rank = rank_zero_only.rank  # this process's global rank, set by Lightning
    world = int(os.environ.get("WORLD_SIZE", 2))  # set by every launcher, Lightning's too
    lost = f"rank {1 - rank} of 2" if world == 2 else f"another of the {world} ranks"
    run_dir = Path(cfg.paths.output_dir)
    try:
        kept = f"the last checkpoint is {locate(run_dir)[1]}"
    except UserError:
        kept = "no checkpoint was written yet"
    return (
        f"lost {lost} ({reason}), so rank {rank} stopped too; {kept}; continue with the "
        f"same launch on every node and resume={run_dir}"
    )


def fsdp_strategy(activation_checkpointing: bool = False, **kwargs: Any) -> Any:
    """Lightning's FSDPStrategy sharding each Transformer block, any family (conf/trainer/fsdp.yaml)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lmlab.models import BLOCKS

    kwargs.setdefault("auto_wrap_policy", set(BLOCKS))
    if activation_checkpointing:
        kwargs.setdefault("activation_checkpointing_policy", set(BLOCKS))
    return FSDPStrategy(**kwargs)


def shard_each_block(model: torch.nn.Module, mesh: Any) -> None:
    """FSDP2: `fully_shard` each Transformer block of any family, then the rest of the model.

    A block's weights are gathered right before it runs and freed after; the
    embeddings and the output layer (tied in GPT) form the outer unit.
    """
    from torch.distributed.fsdp import fully_shard

    from lmlab.models import BLOCKS

    for module in model.modules():
        if isinstance(module, BLOCKS):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
