"""The package's structure: no import cycle, and light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "src" / "lmlab"


def import_graph() -> dict[str, set[str]]:
    """lmlab module -> the lmlab modules it imports, at the top or inside functions."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = f"lmlab.{path.stem}" if path.stem != "__init__" else "lmlab"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                if node.module == "lmlab":  # from lmlab import x
                    imported |= {f"lmlab.{alias.name}" for alias in node.names}
        graph[name] = {m for m in imported if m.startswith("lmlab.") and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert {"lmlab.summary", "lmlab.callbacks", "lmlab.record"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def loaded_by(modules: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded after `import {modules}`."""
    code = f"import sys, {modules}\nprint(','.join(m for m in {watched!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [m for m in done.stdout.strip().split(",") if m]


def test_light_modules_do_not_pull_in_heavy_ones() -> None:
    # The summary, the run record and plotting are read by tools that need neither
    # Lightning nor the callbacks; the Hydra callback that guards run folders runs
    # before anything is loaded.
    light = "lmlab.summary, lmlab.record, lmlab.plot, lmlab.run_folder, lmlab.result"
    assert loaded_by(light, ("lmlab.callbacks", "lightning", "lmlab.recorder")) == []


def test_only_lmlab_hf_imports_transformers() -> None:
    # transformers is the optional `hf` extra, imported only inside lmlab.hf's export: loading,
    # decoding and reading a transformers folder back (import_hf) work without it. (Lightning's
    # torchmetrics imports transformers by itself wherever it is installed, so the runtime
    # check is on the modules that do not import Lightning.)
    # The `tokenizers` library (a core dependency, for tokenizer=bpe) is imported by
    # lmlab.tokenizers too, inside the functions that need it, so loading stays light.
    allowed = {"hf.py": ("transformers", "tokenizers"), "tokenizers.py": ("tokenizers",)}
    for path in sorted(PACKAGE.rglob("*.py")):
        may = allowed.get(path.name, ()) if path.parent == PACKAGE else ()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            roots = {n.split(".")[0] for n in names} & {"transformers", "tokenizers"}
            assert roots <= set(may), path
    modules = "lmlab.checkpoint, lmlab.generation, lmlab.hf, lmlab.tokenizers"
    assert loaded_by(modules, ("transformers", "tokenizers")) == []
