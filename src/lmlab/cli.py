"""Console scripts: `lmlab-train`, `lmlab-generate`, `lmlab-eval` are train.py, generate.py, eval.py.

Each entry point is one line: `entry_point("module:function", "config name")`.
The function takes the composed config; the module is imported only when the
app runs, so `--help` answers without loading torch or Lightning.

Where the configs come from: `conf/` stays at the repository root (train.py,
the tests and every recipe use it there). A plain `pip install .` ships the
same files inside the package as `lmlab/conf` (pyproject maps the package
`lmlab.conf` onto `conf/`), so an installed `lmlab-train` finds them there; a
source checkout (`pip install -e .`, or `PYTHONPATH=src`) reads `conf/`
directly. `--config-dir DIR` adds a folder of your own on top, as in any
Hydra app.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lmlab.errors import report_user_errors
from lmlab.run_folder import further_rank_argv

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The Hydra config tree: shipped in the package (plain install) or the checkout's conf/."""
    candidates = (PACKAGE_DIR / "conf", PACKAGE_DIR.parents[1] / "conf")
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate
    sys.exit(
        f"error: lmlab's configs are not in {' or '.join(map(str, candidates))}; "
        "reinstall lmlab (pip install .) or run from a source checkout"
    )


def _load(target: str) -> Any:
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def print_lightning_lines_once() -> None:
    """Drop the console handler `import lightning` adds when Hydra's job logging is on.

    Hydra's handlers on the root logger already print (and write to train.log)
    every record that Lightning's loggers pass up; Lightning's own handler on
    the `lightning` logger printed each line a second time ("INFO: Seed set").
    """
    root = logging.getLogger()
    if not root.handlers:  # generate.py and eval.py switch Hydra's logging off
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler and lightning_logger.propagate:
            lightning_logger.removeHandler(handler)


# Warnings that every run printed and that nothing in a run can change: Lightning 2.6's
# pytree helper builds torch's `LeafSpec`, which torch 2.13 deprecates (lightning's own
# code, lightning/pytorch/utilities/_pytree.py).
UPSTREAM_NOISE = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


def silence_upstream_noise() -> None:
    """Hide UPSTREAM_NOISE; every other warning still prints."""
    for message in UPSTREAM_NOISE:
        warnings.filterwarnings("ignore", message=message)


def register_plugins() -> None:
    """Register lmlab's Hydra plugins (the Optuna search) by class.

    Hydra finds plugins by listing the `hydra_plugins` namespace package, and it cannot list
    one that an editable install (`pip install -e .`, the README's) serves through an import
    hook, as setuptools does here (conf/ maps into the package): the search failed with
    "Unknown plugin class". Registering the class works however lmlab is installed; the
    module imports only Hydra (Optuna when a search starts).
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.lmlab_sweepers.optuna_search import OptunaSearch

    Plugins.instance().register(OptunaSearch)


def entry_point(
    target: str,
    config_name: str,
    argv_rewrite: str | None = None,
    argv_rewrite_key: str = "resume",
) -> Callable[[], Any]:
    """A console-script function running `target` ("module:function") as a Hydra app.

    When the command line sets `argv_rewrite_key`, `argv_rewrite`
    ("module:function") rewrites it before Hydra reads it: `resume=RUN_DIR`
    picks the run folder and the stored config.
    """

    def task(cfg: DictConfig) -> Any:
        function = _load(target)
        print_lightning_lines_once()
        silence_upstream_noise()
        return function(cfg)

    def main() -> Any:
        # Imported only when the command line asks for it: the rewrite module loads Lightning.
        if argv_rewrite is not None and any(
            arg.lstrip("+").startswith(f"{argv_rewrite_key}=") for arg in sys.argv[1:]
        ):
            sys.argv = report_user_errors(_load(argv_rewrite))(sys.argv)
        sys.argv = further_rank_argv(sys.argv)  # rank 0 alone writes the run folder
        register_plugins()
        app = hydra.main(
            version_base="1.3", config_path=str(config_dir()), config_name=config_name
        )(report_user_errors(task))
        return app()

    main.__doc__ = f"Run {target} with the config `{config_name}` and command-line overrides."
    return main


train_main = entry_point("lmlab.train:main", "train", argv_rewrite="lmlab.resume:resume_argv")
generate_main = entry_point("lmlab.generation:main", "generate")
eval_main = entry_point("lmlab.evaluation:main", "eval")
