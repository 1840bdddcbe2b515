"""Testing aid: a run of train.py over several "nodes" on this machine, each a real torchrun.

`torchrun_nodes` starts one `torchrun --nnodes=N --node-rank=i` per node, all
on 127.0.0.1 with a master port free at that moment and the same command line,
as one would on N machines. On leaving the `with` block every process still
left (torchrun and the workers it started in their own sessions) is killed,
and `wait_for` kills them past its timeout, so a test never hangs on a stuck
rendezvous or a frozen rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT, python_path

# Every process talks over the loopback interface only (gloo picks its interface by name).
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo"}


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


@contextlib.contextmanager
def torchrun_nodes(logs: Path, *overrides: str, nodes: int = 2) -> Iterator[list[Node]]:
    """train.py with `overrides` on `nodes` torchrun nodes; output in `logs`/node<i>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **LOOPBACK_ENV}
    env["PYTHONPATH"] = python_path(env)
    started: list[Node] = []
    try:
        for rank in range(nodes):
            log = logs / f"node{rank}.log"
            with log.open("w") as out:
                process = subprocess.Popen(
                    torchrun_command(nodes, rank, port, *overrides),
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append(Node(rank, process, log))
        yield started
    finally:
        kill(started)


def wait_for(nodes: list[Node], timeout: float) -> list[int]:
    """Every node's torchrun exit code; past `timeout` all of them are killed and it raises."""
    deadline = time.monotonic() + timeout
    try:
        return [node.process.wait(max(deadline - time.monotonic(), 0.1)) for node in nodes]
    except subprocess.TimeoutExpired:
        kill(nodes)
        raise


def _descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, ... (Linux /proc), also those in other sessions."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def frozen(node: Node) -> bool:
    """Whether one of the node's processes is stopped (SIGSTOP: state T)."""
    for pid in _descendants(node.process.pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state == "T":
            return True
    return False


def kill(nodes: list[Node]) -> None:
    """SIGKILL each node's torchrun and every process it started."""
    for node in nodes:
        for pid in [*_descendants(node.process.pid), node.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait()
