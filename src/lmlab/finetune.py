"""Start a new run from trained weights: `python train.py init_from=PATH`, and frozen parameters.

`init_from` is an lmlab checkpoint (a .ckpt file or its URL), a folder written
by `generate.py export=`, or `hf:DIR` (a transformers folder of a GPT-2 or
Llama model, `lmlab.hf`). Unlike `resume=`, which continues a run with its
optimizer, schedule and step, this starts a new one: a new run folder, a fresh
optimizer and schedule, step 0; only the weights come from the source.

The source must be of the config's family and shape. Regularisers and
initialisation ranges may differ (a fine-tune often changes dropout), and so
may the vocabulary: the rows of words in both vocabularies (input embedding,
output layer and its bias) keep their trained values, the corpus's new words
keep their fresh initialisation, and words only the source knew are dropped.

`finetune.freeze` (fnmatch patterns on parameter names, e.g. `blocks.0.*`)
stops parameters from training.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmlab.checkpoint import load_model
from lmlab.download import is_url
from lmlab.errors import UserError
from lmlab.hf import PREFIX as HF_PREFIX
from lmlab.tokenizers import Tokenizer

# The tensors with one row per word, by the names every family gives them.
VOCAB_ROWS = ("token_embedding.weight", "lm_head.weight", "lm_head.bias")
# Config fields that do not change what the weights mean or their shapes.
_FREE_FIELDS = ("vocab_size", "init_range", "lstm_init_range", "weight_drop")
# Fields whose None means a value derived from the others: compared by that value.
_EFFECTIVE = {"n_kv_head": "kv_heads", "mlp_hidden": "hidden"}


@dataclass
class Alignment:
    """How the source's words map onto the new vocabulary."""

    kept: int  # words in both: their rows keep the trained values
    new: int  # words only the new corpus has: freshly initialised rows
    dropped: int  # words only the source had
    unit: str = "words"  # what a row stands for: words, characters or (BPE) tokens

    def describe(self, source: str) -> str:
        u = self.unit
        return (
            f"init_from {source}: {self.kept} {u} keep their trained rows, {self.new} new "
            f"{u} freshly initialised ({self.dropped} {u} of the source not in this corpus)"
        )


# A row of each tokenizer kind's tables stands for one of these.
ROW_UNITS = {"word": "words", "char": "characters", "bpe": "tokens"}


def initialise_from(model: nn.Module, tokenizer: Tokenizer, source: str) -> Alignment:
    """Copy the weights of `source` into `model` (whose tokens are `tokenizer`'s); return the
    alignment. Rows are matched by token text, which means the same only within one kind of
    tokenizer: a word model's rows are words, a char model's characters."""
    _check_exists(source)
    trained, trained_tokenizer = load_model(source)
    if trained_tokenizer.kind != tokenizer.kind:
        raise UserError(
            f"init_from={source} was trained with tokenizer={trained_tokenizer.kind}, this run "
            f"uses tokenizer={tokenizer.kind}; pass tokenizer={trained_tokenizer.kind}"
        )
    check_compatible(trained.config, model.config, source)
    alignment = copy_weights(model, tokenizer.words, trained, trained_tokenizer.words)
    return replace(alignment, unit=ROW_UNITS.get(tokenizer.kind, "tokens"))


def _check_exists(source: str) -> None:
    path = Path(source.removeprefix(HF_PREFIX)).expanduser()
    if not is_url(source) and not path.exists():
        raise UserError(
            f"init_from {source} not found; pass a .ckpt file written by train.py, a folder "
            "written by generate.py export=, or hf:DIR (a transformers folder)"
        )


def check_compatible(
    trained: Any,
    config: Any,
    source: str,
    what: str = "init_from",
    fix: str = "set those values to the source's",
) -> None:
    """One line naming what differs, if `trained` (a config) cannot fill a model of `config`
    (`what`: how the message names the source; `fix`: how it ends)."""
    if trained.family != config.family:
        raise UserError(
            f"{what} {source} is a {trained.family} model but the config's model is "
            f"{config.family}; pick a model= of the {trained.family} family with its shape"
        )
    free = set(_FREE_FIELDS)
    if config.family != "gpt":  # only gpt's positional table depends on block_size
        free.add("block_size")
    differ = []
    for key in config.to_dict():
        attr = _EFFECTIVE.get(key, key)  # n_kv_head=None and n_kv_head=n_head are one shape
        there, here = getattr(trained, attr), getattr(config, attr)
        if key not in free and "dropout" not in key and there != here:
            differ.append(f"model.{key} is {there!r} there, {here!r} here")
    if differ:
        hint = " (model.block_size follows data.seq_len)" if "block_size" in differ[0] else ""
        raise UserError(
            f"{what} {source} has another shape than the config's model: "
            + "; ".join(differ)
            + f"{hint}; {fix}"
        )


def copy_weights(
    model: nn.Module, words: Sequence[str], trained: nn.Module, trained_words: Sequence[str]
) -> Alignment:
    """`trained`'s weights into `model`; per-word rows aligned by word, new words untouched."""
    index = {word: i for i, word in enumerate(trained_words)}
    pairs = [(i, index[word]) for i, word in enumerate(words) if word in index]
    rows = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    trained_rows = torch.tensor([j for _, j in pairs], dtype=torch.long)
    source = trained.state_dict()
    target = model.state_dict()  # shares storage with the parameters: copies land in them
    if set(source) != set(target):
        missing = sorted(set(target) ^ set(source))[:3]
        raise UserError(f"init_from weights do not match the model: {', '.join(missing)} ...")
    with torch.no_grad():
        for name, tensor in target.items():
            value = source[name].to(dtype=tensor.dtype, device=tensor.device)
            if name in VOCAB_ROWS:
                tensor[rows] = value[trained_rows]
            else:
                tensor.copy_(value)
    return Alignment(kept=len(pairs), new=len(words) - len(pairs), dropped=len(index) - len(pairs))


def freeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Stop the parameters whose names match any of `patterns` from training; their names.

    Names are as `named_parameters` gives them, tied ones under each name
    (`lm_head.weight` is `token_embedding.weight` in a tied model).
    """
    named = list(model.named_parameters(remove_duplicate=False))
    names = [name for name, _ in named]
    for pattern in patterns:
        if not isinstance(pattern, str) or not fnmatch.filter(names, pattern):
            raise UserError(
                f"finetune.freeze pattern {pattern!r} matches no parameter; names look like "
                f"{names[0]}, {names[-1]} (fnmatch patterns, e.g. 'blocks.0.*')"
            )
    frozen = [name for name in names if any(fnmatch.fnmatch(name, p) for p in patterns)]
    for name, param in named:
        if name in frozen:
            param.requires_grad_(False)
    if frozen and not any(param.requires_grad for _, param in named):
        raise UserError(f"finetune.freeze={list(patterns)} freezes every parameter; nothing trains")
    return frozen
