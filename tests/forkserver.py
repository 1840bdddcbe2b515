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
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, python_path

_SERVER = r"""
import json, os, runpy, sys, traceback
import hydra, lightning, torch  # the slow imports, done once
import lmlab.train, lmlab.generation, lmlab.evaluation, tensorboard, matplotlib.pyplot
sys.path.insert(0, os.path.dirname(SCRIPT))
child_code = None
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child_code = 1
        try:
            out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
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
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
if child_code is not None:
    sys.stdin.close()
    sys.exit(child_code)
"""


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


class ForkServer:
    def __init__(self, script: str, scratch: Path) -> None:
        self.scratch = scratch
        env = {**os.environ}
        env["PYTHONPATH"] = python_path(env)
        code = f"SCRIPT = {str(ROOT / script)!r}\n" + _SERVER
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.runs = 0

    def run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """Like `conftest.run_entry_point`: returncode (-N for signal N), stdout, stderr."""
        self.runs += 1
        out, err = self.scratch / f"run{self.runs}.out", self.scratch / f"run{self.runs}.err"
        request = {"args": list(args), "env": env or {}, "stdout": str(out), "stderr": str(err)}
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        returncode = json.loads(self.process.stdout.readline())
        return Result(returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)
