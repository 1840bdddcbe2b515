"""Several processes per run: trainer presets, real 2-process DDP on CPU, DDP jobs in a sweep."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
from faults import fault_overrides
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from nodes import frozen, torchrun_nodes, wait_for
from omegaconf import OmegaConf

import lmlab.train
from lmlab.distributed import SweepSetupError, sweep_job_needs_fresh_processes

from conftest import ROOT, run_entry_point, tiny_overrides


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def _result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


@pytest.mark.parametrize("preset", ["ddp", "fsdp", "bf16"])
def test_trainer_presets_compose(preset: str) -> None:
    cfg = _compose(f"trainer={preset}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.use_distributed_sampler is False  # lmlab shards batches itself
    if preset == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, FSDPStrategy)
        assert cfg.trainer.precision == "bf16-mixed"
    if preset == "bf16":
        assert cfg.trainer.precision == "bf16-mixed"


def test_weight_decay_groups_survive_fsdp_flattening() -> None:
    import functools

    import torch

    from lmlab.lit_module import LanguageModel
    from lmlab.models.gpt import GPTConfig

    config = GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    module = LanguageModel(
        config, [f"w{i}" for i in range(50)], functools.partial(torch.optim.AdamW, lr=1e-3)
    )
    matrices = {id(p) for p in module.model.parameters() if p.dim() >= 2}
    for param in module.model.parameters():
        param.data = param.data.flatten()  # what FSDP's sharded views look like
    optimizer = module.configure_optimizers()
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == matrices
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_slurm_launcher_config_renders_an_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", lambda *_: 1)  # no srun here

    cfg = _compose(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # what hydra-submitit-launcher's SlurmLauncher.launch does, short of calling sbatch
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        folder=tmp_path, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --signal=USR1@120",
    ):
        assert line in script


def test_multi_process_sweep_jobs_need_the_basic_launcher(tmp_path: Path) -> None:
    def needs_fresh(*overrides: str) -> bool:
        cfg = _compose(
            "trainer=cpu", f"trainer.default_root_dir={tmp_path}", "hydra.mode=MULTIRUN", *overrides
        )
        HydraConfig.instance().set_config(cfg)
        return sweep_job_needs_fresh_processes(cfg.trainer)

    try:
        assert needs_fresh("trainer.devices=2") is True
        assert needs_fresh("trainer.devices=1") is False
        with pytest.raises(SweepSetupError, match="basic launcher"):
            needs_fresh("trainer.devices=2", "hydra/launcher=submitit_local")
    finally:
        HydraConfig.instance().cfg = None


def train_in_process(*overrides: str, output_dir: Path) -> dict:
    """train.py's steps in this process (no Hydra app, no result.json): the 1-process reference."""
    steps = lmlab.train.main
    while hasattr(steps, "__wrapped__"):  # record_result, stop_on_signals
        steps = steps.__wrapped__
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])
    return steps(cfg)


def _common(corpus_dir: Path, cache_dir: Path, tmp_path: Path) -> list[str]:
    return [
        *tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused"),
        "trainer.max_epochs=1",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]


@pytest.fixture(scope="module")
def one_process(corpus_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """1 process x 16 blocks per step: the same blocks per step as 2 processes x 8."""
    tmp = tmp_path_factory.mktemp("one")
    common = [o for o in _common(corpus_dir, cache_dir, tmp) if not o.startswith("hydra.")]
    return train_in_process(*common, "data.batch_size=16", output_dir=tmp / "run")


def assert_same_metrics(result: dict, reference: dict) -> None:
    assert result["steps"] == reference["steps"]
    for key in ("best_val_ppl", "test_ppl"):
        assert math.isclose(result[key], reference[key], rel_tol=1e-4), key


@pytest.mark.slow
def test_ddp_run_writes_one_folder_and_matches_one_process(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path, one_process: dict
) -> None:
    run = tmp_path / "ddp"
    ddp = run_entry_point(
        "train.py",
        *_common(corpus_dir, cache_dir, tmp_path),
        "trainer.devices=2",
        "data.batch_size=8",
        f"hydra.run.dir={run}",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # no second run folder
    assert sorted(p.relative_to(run) for p in run.rglob("*.ckpt")) == [
        Path("checkpoints/best.ckpt"),
        Path("checkpoints/last.ckpt"),
    ]
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and all(p.parent == run / "tensorboard" for p in events)
    assert len({p.name.rsplit(".", 2)[1] for p in events}) == 1  # one writer pid: rank 0
    assert [p.parent for p in run.rglob(".hydra")] == [run]
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 ran in this folder
    assert "config identical on all 2 processes" in (run / "train.log").read_text()

    result = _result(run)
    assert result["status"] == "completed"
    assert_same_metrics(result, one_process)


def test_bf16_preset_trains_on_cpu(corpus_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    common = [o for o in _common(corpus_dir, cache_dir, tmp_path) if not o.startswith("hydra.")]
    result = train_in_process(
        *common,
        "trainer=bf16",
        "trainer.accelerator=cpu",
        "trainer.limit_train_batches=5",
        "test=false",
        output_dir=tmp_path / "run",
    )
    assert math.isfinite(result["best_val_ppl"])


@pytest.mark.slow
def test_sweep_of_two_process_jobs(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path, one_process: dict
) -> None:
    sweep = tmp_path / "sweep"
    result = run_entry_point(
        "train.py",
        "-m",
        *_common(corpus_dir, cache_dir, tmp_path),
        "trainer.devices=2",
        "data.batch_size=8",
        "optimizer.lr=1e-2,1e30",  # the second job diverges
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 1, result.stderr[-3000:]  # a job failed; the sweep finished
    assert "error: 1 of 2 jobs failed" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]  # no other run or sweep folder
    assert [p.parent for p in tmp_path.rglob("multirun.yaml")] == [sweep]  # no second sweep
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep / "1" / "checkpoints" / "last.ckpt").exists()  # no NaN weights saved
    for job in ("0", "1"):
        folder = sweep / job
        assert (folder / "train_ddp_process_1.log").is_file()  # both ranks used the job folder
        assert [p.parent for p in folder.rglob(".hydra")] == [folder]
    done, diverged = _result(sweep / "0"), _result(sweep / "1")
    assert done["status"] == "completed"
    assert_same_metrics(done, one_process)  # 2 processes x 8 blocks = 1 x 16
    assert "config identical on all 2 processes" in (sweep / "0" / "train.log").read_text()
    assert diverged["status"] == "failed" and "training loss is nan" in diverged["error"]
    assert "optimizer.lr=1e+30" in diverged["overrides"]
    assert len((sweep / "summary.csv").read_text().splitlines()) == 3


LSTM_CONTIGUOUS = ["model=lstm_tiny", "data.order=contiguous"]


@pytest.mark.slow
def test_an_lstm_in_the_contiguous_order_trains_the_same_on_two_processes(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # 1 process x 16 streams reads what 2 processes x 8 read, and carries the same states
    common = [o for o in _common(corpus_dir, cache_dir, tmp_path) if not o.startswith("hydra.")]
    reference = train_in_process(
        *common,
        *LSTM_CONTIGUOUS,
        "data.batch_size=16",
        "data.eval_batch_size=128",
        output_dir=tmp_path / "one",
    )
    run = tmp_path / "ddp"
    ddp = run_entry_point(
        "train.py",
        *_common(corpus_dir, cache_dir, tmp_path),
        *LSTM_CONTIGUOUS,
        "trainer.devices=2",
        "data.batch_size=8",
        "data.eval_batch_size=64",
        "callbacks.periodic_checkpoint.every_n_train_steps=3",  # gathers both ranks' states
        f"hydra.run.dir={run}",
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same_metrics(_result(run), reference)
    carried = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)[
        "lmlab_carried_state"
    ]
    h0 = carried["state"]["h0"]  # (ranks, 1, streams per rank, hidden): each rank's own
    assert carried["ranks"] == 2 and h0.shape[0] == 2 and h0.shape[-2] == 8
    assert not torch.equal(h0[0], h0[1])


def _two_node_overrides(corpus_dir: Path, cache_dir: Path, run: Path) -> list[str]:
    return [
        *tiny_overrides(corpus_dir, cache_dir, run),
        "trainer.max_epochs=1",  # 13 steps
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "data.batch_size=8",
        "callbacks.periodic_checkpoint.every_n_train_steps=4",
    ]


@pytest.fixture(scope="module")
def two_nodes(corpus_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted run on two torchrun nodes of one process each: (run folder, nodes)."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    run = tmp / "run"
    with torchrun_nodes(tmp / "logs", *_two_node_overrides(corpus_dir, cache_dir, run)) as nodes:
        codes = wait_for(nodes, timeout=240)
    assert codes == [0, 0], nodes[codes.index(max(codes))].output()[-3000:]
    return run, nodes


@pytest.mark.slow
def test_two_torchrun_nodes_write_one_folder_and_match_one_process(
    two_nodes: tuple[Path, list], one_process: dict
) -> None:
    run, nodes = two_nodes
    assert [p.parent for p in run.rglob(".hydra")] == [run]
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    log = (run / "train.log").read_text()
    assert "config identical on all 2 processes" in log
    assert "[rank: 1]" not in log and "GLOBAL_RANK: 1" not in log  # rank 1 logs to its node only
    assert "GLOBAL_RANK: 1" in nodes[1].output()
    events = list(run.rglob("events.out.tfevents.*"))
    assert len({p.name.rsplit(".", 2)[1] for p in events}) == 1  # one writer pid: rank 0
    assert sorted(p.name for p in run.glob("checkpoints/*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert not list(run.glob("train_ddp_process_*.log"))
    # 2 nodes x 1 process x 8 blocks = 1 process x 16 blocks (= 1 node x 2 devices, above)
    assert_same_metrics(_result(run), one_process)


def _worker_output(node_output: str) -> tuple[str, list[str]]:
    """What a node's worker printed before torchrun's failure report, and its error lines."""
    worker = node_output.split("torch/distributed/elastic/multiprocessing/api.py")[0]
    return worker, [line for line in worker.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_a_killed_node_stops_the_other_with_one_line_and_the_run_resumes_exactly(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path, two_nodes: tuple[Path, list]
) -> None:
    run = tmp_path / "run"
    overrides = _two_node_overrides(corpus_dir, cache_dir, run)
    # node 1's process is killed after step 6 (mid-epoch); last.ckpt was written at step 4
    with torchrun_nodes(
        tmp_path / "killed", *overrides, *fault_overrides("sigkill", 6, rank=1)
    ) as nodes:
        assert nodes[1].process.wait(timeout=240) != 0
        assert nodes[0].process.wait(timeout=60) != 0  # within 60 s of node 1's end
    worker, errors = _worker_output(nodes[0].output())
    assert "Traceback" not in worker
    assert len(errors) == 1, worker[-3000:]
    # gloo says closed or reset, depending on what the survivor was doing at that moment
    assert re.match(r"error: lost rank 1 of 2 \(Connection (closed|reset) by peer", errors[0])
    assert f"the last checkpoint is {run / 'checkpoints' / 'last.ckpt'}" in errors[0]
    assert errors[0].endswith(f"resume={run}")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    with torchrun_nodes(tmp_path / "resumed", f"resume={run}", *fault_overrides(None)) as nodes:
        codes = wait_for(nodes, timeout=240)
    assert codes == [0, 0], nodes[codes.index(max(codes))].output()[-3000:]
    assert [p.name for p in (run / ".hydra").glob("resume-*")] == ["resume-1"]  # rank 0's only
    reference, _ = two_nodes
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    uninterrupted = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == uninterrupted["global_step"] == 13
    for name, tensor in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    for key in ("best_val_ppl", "test_ppl"):
        assert _result(run)[key] == _result(reference)[key], key


@pytest.mark.slow
def test_a_frozen_node_stops_the_other_after_the_collective_timeout(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    overrides = [
        *_two_node_overrides(corpus_dir, cache_dir, tmp_path / "run"),
        "trainer.strategy.timeout.seconds=10",
        *fault_overrides("sigstop", 6, rank=1),  # node 1 stays, answering nothing
    ]
    with torchrun_nodes(tmp_path / "logs", *overrides) as nodes:
        deadline = time.monotonic() + 240
        while not frozen(nodes[1]):
            assert time.monotonic() < deadline and nodes[1].process.poll() is None
            time.sleep(0.2)
        assert nodes[0].process.wait(timeout=60) != 0
    worker, errors = _worker_output(nodes[0].output())
    assert "Traceback" not in worker
    assert len(errors) == 1, worker[-3000:]
    assert errors[0].startswith("error: lost rank 1 of 2 (Timed out waiting 10000ms")


@pytest.mark.slow
def test_num_nodes_that_do_not_match_torchrun_stop_with_one_line(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = _two_node_overrides(corpus_dir, cache_dir, run)
    with torchrun_nodes(tmp_path / "logs", *overrides, nodes=1) as (node,):  # WORLD_SIZE=1
        assert wait_for([node], timeout=120) == [1]  # torchrun's code for a failed worker
    output = node.output()
    worker, _, torchrun_report = output.partition("error: ")
    assert "Traceback" not in worker  # the worker stopped with one line, exit code 2 ...
    assert torchrun_report.splitlines()[0] == (
        "trainer.num_nodes=2 x trainer.devices=1 = 2 processes, but torchrun started 1 "
        "(WORLD_SIZE=1); make them match --nnodes x --nproc-per-node"
    )
    assert "exitcode  : 2" in torchrun_report  # ... which torchrun reports below it
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_ddp_and_resumes_exactly(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path, one_process: dict
) -> None:
    fsdp2 = [
        *(o for o in _common(corpus_dir, cache_dir, tmp_path) if o != "trainer=cpu"),
        "trainer=fsdp2",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=8",
    ]
    straight, run = tmp_path / "straight", tmp_path / "stopped"
    done = run_entry_point("train.py", *fsdp2, f"hydra.run.dir={straight}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_metrics(_result(straight), one_process)  # 2 shards x 8 = DDP 2 x 8 = 1 x 16

    stopped = run_entry_point(
        "train.py", *fsdp2, f"hydra.run.dir={run}", *fault_overrides("sigterm", 5)
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5  # one plain file
    resumed = run_entry_point("train.py", f"resume={run}", *fault_overrides(None))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 13
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name
    for key in ("best_val_ppl", "test_ppl"):
        assert _result(run)[key] == _result(straight)[key], key
