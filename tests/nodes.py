"""Testing aid: a run of train.py over several "nodes" on this machine, each a real torchrun.

`start_nodes` starts one `torchrun --nnodes=N --node-rank=i` per node, all on
127.0.0.1 with a master port free at that moment, with the same command line,
as one would on N machines. Each torchrun is its own process group (so a test
can kill one node whole) and has a timeout, so a test never hangs on a stuck
rendezvous.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT, python_path

# Every process talks over the loopback interface only (gloo picks the interface by name).
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    rank: int
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def torchrun_command(nodes: int, node_rank: int, port: int, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the torchrun command runs
        f"--nnodes={nodes}",
        "--nproc-per-node=1",
        f"--node-rank={node_rank}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        str(ROOT / "train.py"),
        *overrides,
    ]


def start_nodes(logs: Path, *overrides: str, nodes: int = 2, timeout: float = 240) -> list[Node]:
    """Start train.py with `overrides` on `nodes` torchrun nodes; their output goes to `logs`/node<i>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **LOOPBACK_ENV}
    env["PYTHONPATH"] = python_path(env)
    started = []
    for rank in range(nodes):
        log = logs / f"node{rank}.log"
        command = ["timeout", "-s", "KILL", str(int(timeout))]
        command += torchrun_command(nodes, rank, port, *overrides)
        with log.open("w") as out:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(Node(rank, process, log))
    return started


def wait_for(nodes: list[Node], timeout: float) -> list[int]:
    """Wait until every node's torchrun has exited; their exit codes. Kills them all past `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        return [node.process.wait(max(deadline - time.monotonic(), 0.1)) for node in nodes]
    except subprocess.TimeoutExpired:
        kill(nodes)
        raise


def kill(nodes: list[Node]) -> None:
    """SIGKILL each node's whole process group (its torchrun and its workers)."""
    for node in nodes:
        if node.process.poll() is None:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()
