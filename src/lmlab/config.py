"""Checks on a composed training config, and building the lists Lightning takes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmlab.checks import is_int, is_number
from lmlab.errors import UserError, brief


def _in(
    low: float, high: float, low_open: bool = False, high_open: bool = False
) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    return check


def _int(low: int) -> Callable[[Any], bool]:
    return lambda value: is_int(value) and value >= low


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: not isinstance(value, bool) and value in choices


def _run_limit(value: Any) -> bool:
    """`max_epochs`, `max_steps`: a positive count, or -1 for no limit."""
    return is_int(value) and (value == -1 or value >= 1)


def _batch_limit(value: Any) -> bool:
    """`limit_*_batches`: a fraction of the split, or a number of batches."""
    return (is_int(value) and value >= 0) or (is_number(value) and 0 <= value <= 1)


def _interval(value: Any) -> bool:
    """`val_check_interval`: a fraction of an epoch, or a number of batches."""
    return (is_int(value) and value >= 1) or (is_number(value) and 0 < value <= 1)


def _epsilon(value: Any) -> bool:
    """AdamW's and SGD's one epsilon, or Adafactor's two (the first may be None)."""
    if is_number(value):
        return value > 0
    if isinstance(value, (list, tuple, ListConfig)) and len(value) == 2:
        first, second = value
        return (first is None or (is_number(first) and first >= 0)) and (
            is_number(second) and second >= 0
        )
    return False


def _probability_pair(value: Any) -> bool:
    return len(value) == 2 and all(is_number(v) and 0 <= v < 1 for v in value)


PRECISIONS = ("auto", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")
PRECISIONS += ("64", "32", "16", "bf16", 64, 32, 16)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
POSITIVE = "a positive integer"
NUMBER = "a number"

# The typed schema of the training config: key, what its value must be, the
# test. A key may have a type rule, then a range rule. Keys a config does not
# have are skipped (optimizers take different arguments).
RULES: list[tuple[str, str, Callable[[Any], bool]]] = [
    ("seed", "an integer", is_int),
    ("test", "true or false", _is_bool),
    ("compile", "true, false or auto", lambda v: _is_bool(v) or v == "auto"),
    (
        "init_from",
        "a checkpoint path, a URL, an exported folder or hf:DIR (or null)",
        _or_null(lambda v: isinstance(v, str) and bool(v.strip())),
    ),
    (
        "finetune.freeze",
        "a list of parameter name patterns, e.g. ['blocks.0.*']",
        lambda v: isinstance(v, list) and all(isinstance(p, str) and p for p in v),
    ),
    ("optimizer.lr", NUMBER, is_number),
    ("optimizer.lr", "> 0", _in(0, math.inf, low_open=True)),
    ("optimizer.weight_decay", NUMBER, is_number),
    ("optimizer.weight_decay", ">= 0", _in(0, math.inf)),
    (
        "optimizer.eps",
        "a number > 0 (Adafactor's: a pair [eps1 or null, eps2] of numbers >= 0)",
        _epsilon,
    ),
    ("optimizer.momentum", NUMBER, is_number),
    ("optimizer.momentum", "in [0, 1)", _in(0, 1, high_open=True)),
    ("optimizer.betas", "two numbers in [0, 1)", _probability_pair),
    ("optimizer.beta2_decay", NUMBER, is_number),  # Adafactor's
    ("optimizer.beta2_decay", "<= 0", _in(-math.inf, 0)),
    ("optimizer.d", NUMBER, is_number),
    ("optimizer.d", ">= 1", _in(1, math.inf)),
    ("data.seq_len", POSITIVE, _int(1)),
    ("data.batch_size", POSITIVE, _int(1)),
    ("data.eval_batch_size", f"{POSITIVE} or null", _or_null(_int(1))),
    ("data.num_workers", "a non-negative integer", _int(0)),
    ("model.block_size", POSITIVE, _int(1)),
    ("model.n_layer", POSITIVE, _int(1)),
    ("model.n_head", POSITIVE, _int(1)),
    ("model.n_embd", POSITIVE, _int(1)),
    ("model.mlp_ratio", POSITIVE, _int(1)),
    ("model.dropout", NUMBER, is_number),
    ("model.dropout", "in [0, 1)", _in(0, 1, high_open=True)),
    ("model.attn_dropout", f"{NUMBER} or null", _or_null(is_number)),
    ("model.attn_dropout", "in [0, 1) or null", _or_null(_in(0, 1, high_open=True))),
    ("model.bias", "true or false", _is_bool),
    ("model.n_kv_head", f"{POSITIVE} or null", _or_null(_int(1))),
    ("model.n_hidden", POSITIVE, _int(1)),
    *(
        rule
        for name in ("dropout_hidden", "dropout_input", "dropout_embedding", "weight_drop")
        for rule in (
            (f"model.{name}", NUMBER, is_number),
            (f"model.{name}", "in [0, 1)", _in(0, 1, high_open=True)),
        )
    ),
    ("model.tie_weights", "true or false", _is_bool),
    ("model.tie_embeddings", "true or false", _is_bool),
    ("data.order", "one of shuffled, contiguous", _one_of("shuffled", "contiguous")),
    ("scheduler.warmup_steps", "a non-negative integer", _int(0)),
    ("scheduler.min_lr_ratio", NUMBER, is_number),
    ("scheduler.min_lr_ratio", "in [0, 1]", _in(0, 1)),
    ("scheduler.decay_after", "a non-negative integer", _int(0)),
    ("scheduler.factor", NUMBER, is_number),
    ("scheduler.factor", "in (0, 1]", _in(0, 1, low_open=True)),
    (
        "scheduler.epochs",
        f"{POSITIVE} (it follows trainer.max_epochs; with no epoch limit set scheduler.epochs=N)",
        _int(1),
    ),
    ("callbacks.averaging.decay", NUMBER, is_number),
    ("callbacks.averaging.decay", "in (0, 1)", _in(0, 1, low_open=True, high_open=True)),
    ("callbacks.averaging.start_fraction", NUMBER, is_number),
    ("callbacks.averaging.start_fraction", "in [0, 1)", _in(0, 1, high_open=True)),
    ("callbacks.averaging.start_step", "an integer >= 0 or null", _or_null(_int(0))),
    (
        "callbacks.budget.seconds",
        "a positive number of seconds or null",
        _or_null(lambda v: is_number(v) and v > 0),
    ),
    ("trainer.accelerator", f"one of {', '.join(ACCELERATORS)}", _one_of(*ACCELERATORS)),
    (
        "trainer.devices",
        f"{POSITIVE}, -1 or 'auto'",
        lambda v: v in ("auto", -1) or (is_int(v) and v >= 1),
    ),
    ("trainer.num_nodes", POSITIVE, _int(1)),
    ("trainer.precision", f"one of {', '.join(PRECISIONS[:7])}", _one_of(*PRECISIONS)),
    ("trainer.max_epochs", f"{POSITIVE} (or -1 for no limit)", _or_null(_run_limit)),
    ("trainer.max_steps", f"{POSITIVE} (or -1 for no limit)", _run_limit),
    ("trainer.gradient_clip_val", ">= 0 or null", _or_null(_in(0, math.inf))),
    ("trainer.accumulate_grad_batches", POSITIVE, _int(1)),
    ("trainer.log_every_n_steps", POSITIVE, _int(1)),
    ("trainer.val_check_interval", "in (0, 1] or a number of batches", _interval),
    ("trainer.check_val_every_n_epoch", f"{POSITIVE} or null", _or_null(_int(1))),
    (
        "trainer.limit_train_batches",
        "in [0, 1], a number of batches or null",
        _or_null(_batch_limit),
    ),
    ("trainer.limit_val_batches", "in [0, 1], a number of batches or null", _or_null(_batch_limit)),
    (
        "trainer.limit_test_batches",
        "in [0, 1], a number of batches or null",
        _or_null(_batch_limit),
    ),
]
_ABSENT = object()
# What LanguageModel logs at every validation: what a checkpoint callback can monitor.
MONITORED = ("val/ppl", "val/loss", "val/word_ppl", "val/bpc")
EVERY_N_STEPS = (
    "every_n_train_steps",
    "a non-negative integer (0: never) or null",
    _or_null(_int(0)),
)


def check_train_config(cfg: DictConfig) -> None:
    """Stop with one line on the first value of the wrong type or out of range, before any work."""
    files = OmegaConf.select(cfg, "data.files")
    for split in ("train", "valid", "test"):
        if isinstance(files, DictConfig) and OmegaConf.is_missing(files, split):
            raise UserError(
                f"data.files.{split} is not set: data=text reads three files of data.data_dir, "
                "give them as data.files.train=NAME data.files.valid=NAME data.files.test=NAME"
            )
    rules = list(RULES)
    for name, node in (cfg.get("callbacks") or {}).items():
        monitor = node.get("monitor") if isinstance(node, DictConfig) else None
        if monitor is not None and monitor not in MONITORED:
            raise UserError(
                f"callbacks.{name}.monitor must be one of {', '.join(MONITORED)} (what each "
                f"validation logs), got {monitor!r}"
            )
        if isinstance(node, DictConfig) and EVERY_N_STEPS[0] in node:
            rules.append((f"callbacks.{name}.{EVERY_N_STEPS[0]}", *EVERY_N_STEPS[1:]))
    for key, expected, check in rules:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, ListConfig):
            value = list(value)
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            raise UserError(f"{key} must be {expected}, got {value!r}")

    # what single values cannot show: n_embd divisible by n_head, and the like
    model_args = {k: v for k, v in cfg.model.items() if k != "_target_"}
    try:
        get_class(cfg.model._target_)(**model_args)
    except TypeError as error:  # an argument the family does not have
        raise UserError(f"model: {error}".replace("__init__() ", "")) from None
    except ValueError as error:
        raise UserError(str(error)) from None


def instantiate_each(cfg: DictConfig, group: str) -> list[Any]:
    """One object per named node of `cfg.<group>` (`callbacks`, `logger`); an empty or null
    group gives [].

    A null node, or one whose target returns None (a callback switched off by a trainer
    flag, such as the progress bar), gives nothing. A value a target refuses (ValueError,
    TypeError, Lightning's MisconfigurationException) is one line naming the node
    (`callbacks.samples: top_p must be ...`), not a traceback.
    """
    nodes = cfg.get(group)
    if not nodes:
        return []
    objects = (
        _instantiated(f"{group}.{name}", node) for name, node in nodes.items() if node is not None
    )
    return [obj for obj in objects if obj is not None]


def _instantiated(where: str, node: DictConfig) -> Any:
    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise UserError(f"{where}: {brief(cause)}") from error
        raise
