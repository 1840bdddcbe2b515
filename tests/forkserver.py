"""Run an entry point many times without paying for its imports each time.

`python train.py` spends most of a tiny run importing torch, Lightning and
Hydra. `ForkServer` starts one helper process that imports them once (and
computes nothing, so forking it is safe), then forks a fresh child per run
that executes the script as `__main__` with the given arguments and
environment: the same code path as a new process, exit status and signals
included, for a fraction of the CPU time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, python_path

_SERVER = r"""
import json, logging, os, runpy, sys, traceback
# A run of a script with Hydra's job logging on (train.py) imports Lightning after Hydra
# gave the root logger its handlers, so Lightning adds no console handlers of its own.
stand_in = logging.NullHandler()
if JOB_LOGGING:
    logging.getLogger().addHandler(stand_in)
import hydra, lightning, torch  # the slow imports, done once
import lmlab.train, lmlab.generation, lmlab.evaluation, tensorboard, matplotlib.pyplot
logging.getLogger().removeHandler(stand_in)
sys.path.insert(0, os.path.dirname(SCRIPT))
child_code = None
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child_code = 1
        try:
            quiet = os.open(os.devnull, os.O_RDONLY)  # a run never reads the server's requests
            out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(quiet, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [SCRIPT, *request["args"]]
            runpy.run_path(SCRIPT, run_name="__main__")
            child_code = 0
        except SystemExit as stop:
            code = stop.code
            child_code = code if isinstance(code, int) else (0 if code is None else 1)
        except BaseException:
            traceback.print_exc()
        break  # the child ends as a process does: atexit handlers run (they release run locks)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
if child_code is not None:
    sys.stdin.close()
    sys.exit(child_code)
os._exit(0)  # the server itself: nothing to flush, and torch's shutdown takes seconds
"""


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


class ForkServer:
    def __init__(self, script: str, scratch: Path) -> None:
        self.script, self.scratch = script, scratch
        env = {**os.environ}
        env["PYTHONPATH"] = python_path(env)
        job_logging = script == "train.py"  # generate.py and eval.py switch Hydra's logging off
        code = f"SCRIPT = {str(ROOT / script)!r}\nJOB_LOGGING = {job_logging}\n" + _SERVER
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # unbuffered, so select() sees every line the server writes
        )
        self.runs = 0

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> Result:
        """Like `conftest.run_entry_point`: returncode (-N for signal N), stdout, stderr.

        The run sees this process's environment at the time of the call, `env` on top
        (as a new process would); past `timeout` seconds it is killed and
        `subprocess.TimeoutExpired` raised, as `subprocess.run` does.
        """
        self.runs += 1
        out, err = self.scratch / f"run{self.runs}.out", self.scratch / f"run{self.runs}.err"
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = python_path(full_env)
        request = {"args": list(args), "env": full_env, "stdout": str(out), "stderr": str(err)}
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        pid = self._answer()["pid"]
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            self._answer()
            raise subprocess.TimeoutExpired([self.script, *args], timeout)
        returncode = self._answer()["returncode"]
        return Result(returncode, out.read_text(), err.read_text())

    def _answer(self) -> dict:
        """The server's next line, read byte by byte so nothing waits in a buffer."""
        assert self.process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            byte = os.read(self.process.stdout.fileno(), 1)
            if not byte:
                raise RuntimeError("the fork server stopped")
            line += byte
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()
