"""Safe loading and self-describing checkpoints.

A checkpoint written by train.py is a Lightning checkpoint: the weights under
`state_dict` (keys prefixed `model.`) and, under `lmlab`, the model config,
the vocabulary (the token list) and the tokenizer (`lmlab.tokenizers`) as plain values. So `load_model` rebuilds the model (any family) from
the file alone: no Trainer, no dataset. `export` writes the same model as files
any tool can read: `model.safetensors`, `config.json` (the model config) and
`vocab.json` (and `lmlab_tokenizer.json` for a char or BPE model); `load_model` reads that
folder too. With `export_format="hf"` it writes a Hugging Face transformers folder
instead (`lmlab.hf`), which `load_model` reads back from `hf:DIR` (or DIR).

Loading never runs code from the file. `torch.load` gets `weights_only=True`
explicitly: torch (>= 2.6, see `torch.serialization.load`) lets
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` override only a call that left
`weights_only` unset, and the tests check this with the variable set. What the
weights-only unpickler lets through is then checked to hold nothing but
tensors and plain values.

    python -m lmlab.checkpoint export CKPT DIR [--format hf]
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lmlab.atomic import write_atomically
from lmlab.download import download, is_url
from lmlab.errors import UserError, brief, report_user_errors
from lmlab.hf import CONFIG_FILE, WEIGHTS_FILE, export_hf, import_hf, is_hf_folder
from lmlab.hf import PREFIX as HF_PREFIX
from lmlab.models import ModelConfig, build_model, config_from_dict
from lmlab.tokenizers import Tokenizer, tokenizer_from_dict
from lmlab.vocab import Vocabulary

# CONFIG_FILE and WEIGHTS_FILE come from lmlab.hf: lmlab's own export folder keeps Hugging
# Face's file names, so that the two export formats differ only in what those files hold.
METADATA_KEY = "lmlab"  # checkpoint["lmlab"]: what a checkpoint says about itself
CHECKPOINT_FORMAT = 1
MODEL_PREFIX = "model."  # LanguageModel keeps the network as `self.model`

MODEL_CONFIG_FILE = "model_config.json"  # the model config beside a run's checkpoints
VOCAB_FILE = "vocab.json"
EXPORT_FORMATS = ("safetensors", "hf")  # lmlab's own folder; a Hugging Face transformers folder
TOKENIZER_FILE = "lmlab_tokenizer.json"  # a char or BPE model's tokenizer (word needs none)

# What the weights-only unpickler says when a file asks for code or objects.
_UNSAFE_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"call reduce for unrecognized function ([^\n]+)"),
    re.compile(r"Can only (?:create new object|build)[^\n]*but got ([^\n]+)"),
)
_PLAIN_TYPES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_REFUSED = "refusing to load it; only lmlab checkpoints of tensors and plain values are accepted"


# ---------------------------------------------------------------------------
# What a checkpoint says about itself.


def checkpoint_metadata(
    model_config: ModelConfig, vocab_words: Sequence[str], tokenizer: dict | None = None
) -> dict:
    """`checkpoint["lmlab"]`: the format, the model config, the vocabulary and the tokenizer
    (its `to_dict()`; None: `word`), as plain values.

    The one builder of this dict: `LanguageModel.on_save_checkpoint` stores it,
    `write_model_files` writes its readable copies beside the checkpoints and
    into an exported folder, and `load_model` reads it back.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": model_config.to_dict(),
        "vocab": list(vocab_words),
        "tokenizer": dict(tokenizer or {"kind": "word"}),
    }


def write_model_files(
    folder: str | Path, metadata: dict, config_file: str = MODEL_CONFIG_FILE
) -> None:
    """The readable copies of `metadata`: the model config (`config_file`), `vocab.json` and,
    for a char or BPE model, its tokenizer."""
    folder = Path(folder)
    write_atomically(folder / config_file, json.dumps(metadata["model_config"], indent=2) + "\n")
    Vocabulary(metadata["vocab"]).save(folder / VOCAB_FILE)
    tokenizer = metadata.get("tokenizer") or {"kind": "word"}
    if tokenizer["kind"] != "word":
        write_atomically(folder / TOKENIZER_FILE, json.dumps(tokenizer, ensure_ascii=False))


# ---------------------------------------------------------------------------
# Reading a .ckpt file without running code from it.


def read_checkpoint(source: str | Path) -> dict[str, Any]:
    """The checkpoint dict at a path or an http(s) URL, loaded without running any code."""
    name = str(source)
    if is_url(source):
        with tempfile.TemporaryDirectory(prefix="lmlab-ckpt-") as folder:
            path = download(name, Path(folder) / "download.ckpt", what="checkpoint ")
            return _load_plain(path, name)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"checkpoint {name} not found; pass ckpt= a .ckpt file written by train.py "
            "(e.g. outputs/runs/<date>/checkpoints/best.ckpt), an exported folder or an http(s) URL"
        )
    if path.is_dir():
        raise UserError(f"checkpoint {name} is a folder; pass the .ckpt file inside it")
    return _load_plain(path, name)


def _load_plain(path: Path, name: str) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {name} is empty; copy it again or pass another checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        for pattern in _UNSAFE_PATTERNS:
            found = pattern.search(message)
            if found:
                raise UserError(
                    f"checkpoint {name} holds pickled code or objects ({found.group(1).strip()}): "
                    + _REFUSED
                ) from None
        raise _corrupted(name, error) from None
    except Exception as error:  # damaged files raise EOFError, RuntimeError, KeyError, ...
        if "TorchScript" in str(error):
            raise UserError(
                f"{name} is a TorchScript archive, not an lmlab checkpoint; "
                "pass a .ckpt file written by train.py"
            ) from None
        raise _corrupted(name, error) from None
    where = _first_non_plain(obj)
    if where is not None:
        raise UserError(f"checkpoint {name} holds pickled code or objects ({where}): " + _REFUSED)
    if not isinstance(obj, dict):
        raise UserError(
            f"{name} holds a {type(obj).__name__}, not an lmlab checkpoint; "
            "pass a .ckpt file written by train.py"
        )
    return obj


def _corrupted(name: str, error: BaseException) -> UserError:
    reason = " ".join(str(error).split()).split(". ")[0][:160]  # its first sentence
    return UserError(
        f"checkpoint {name} is truncated or corrupted, or not a PyTorch checkpoint "
        f"({type(error).__name__}: {reason}); copy it again or pass another checkpoint"
    )


def _first_non_plain(obj: Any) -> str | None:
    """Where `obj` holds something other than tensors, plain values and containers of them."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, where = stack.pop()
        kind = type(value)
        if kind in (dict, OrderedDict):
            stack.extend((v, f"{where}[{k!r}]") for k, v in value.items())
            stack.extend((k, f"{where} key") for k in value)
        elif kind in (list, tuple):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif kind not in _TENSOR_TYPES and kind not in _PLAIN_TYPES:
            return f"a {kind.__module__}.{kind.__qualname__} at {where or 'the top'}"
    return None


# ---------------------------------------------------------------------------
# Rebuilding the model.


def load_model(
    source: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Tokenizer]:
    """The model (in eval mode, on `device`), of whichever family it is, and its tokenizer.

    `source` is a .ckpt file written by train.py, an http(s) URL of one, a
    folder written by `export` (or the `model.safetensors` file inside it), or
    a Hugging Face transformers folder of a GPT-2 or Llama model (`hf:DIR`, or DIR).
    """
    name = str(source)
    path = None if is_url(source) else Path(source).expanduser()
    if name.startswith(HF_PREFIX) or (path is not None and is_hf_folder(path)):
        model, vocab = import_hf(name)
        return model.to(device).eval(), vocab
    if path is not None and path.suffix == ".safetensors" and path.is_file():
        if path.name != WEIGHTS_FILE:
            raise UserError(
                f"{name} is a bare safetensors file; load_model reads a folder written by "
                f"export: {WEIGHTS_FILE}, {CONFIG_FILE} and {VOCAB_FILE}"
            )
        path = path.parent
    if path is not None and path.is_dir():
        model, vocab = _load_export(path, name)
    else:
        config, words, tokenizer, state = _unpack(read_checkpoint(source), name)
        model, vocab = _build(config, words, tokenizer, name)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise UserError(
                f"checkpoint {name} does not match its own model config: {brief(error)}"
            ) from None
    return model.to(device).eval(), vocab


def _unpack(checkpoint: dict, name: str) -> tuple[dict, list, dict | None, dict]:
    meta = checkpoint.get(METADATA_KEY)
    if meta is None:
        raise UserError(
            f"{name} is not an lmlab checkpoint: it has no {METADATA_KEY!r} entry with the "
            "model config and vocabulary; pass a .ckpt file written by train.py"
        )
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(
            f"{name} has lmlab checkpoint format {found!r}; this lmlab reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    state = checkpoint.get("state_dict")
    weights = {}
    if isinstance(state, dict):
        weights = {
            key[len(MODEL_PREFIX) :]: value
            for key, value in state.items()
            if isinstance(key, str) and key.startswith(MODEL_PREFIX)
        }
    if not weights:
        raise UserError(f"{name} has no model weights (no 'state_dict' with 'model.' keys)")
    return meta.get("model_config"), meta.get("vocab"), meta.get("tokenizer"), weights


def _build(config: Any, words: Any, tokenizer: Any, name: str) -> tuple[torch.nn.Module, Tokenizer]:
    if not isinstance(config, dict):
        raise UserError(f"{name} has no model config (a dict of the model's arguments)")
    try:
        model_config = config_from_dict(config)
    except (TypeError, ValueError) as error:
        raise UserError(f"{name} has an invalid model config: {error}") from None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise UserError(f"{name} has no vocabulary (a list of words)")
    if tokenizer is not None and not isinstance(tokenizer, dict):
        raise UserError(f"{name} has an invalid tokenizer (a dict of plain values)")
    try:
        vocab = tokenizer_from_dict(tokenizer, words)
    except ValueError as error:
        raise UserError(f"{name} has an invalid vocabulary or tokenizer: {error}") from None
    if len(vocab) != model_config.vocab_size:
        raise UserError(
            f"{name} has {len(vocab)} vocabulary words but a model config with "
            f"vocab_size={model_config.vocab_size}"
        )
    return build_model(model_config), vocab


# ---------------------------------------------------------------------------
# Export: safetensors weights plus readable JSON.


def export(
    model: torch.nn.Module,
    vocab: Tokenizer,
    folder: str | Path,
    export_format: str = "safetensors",
    source: str | None = None,
) -> Path:
    """Write `model.safetensors`, `config.json` and `vocab.json` into `folder`; return it.

    `export_format="hf"`: a Hugging Face transformers folder instead (`lmlab.hf.export_hf`;
    `source`, the checkpoint, goes into its model card).
    """
    check_export_format(export_format)
    check_export_folder(folder)
    if export_format == "hf":
        return export_hf(model, vocab, folder, source)
    out = Path(folder).expanduser()
    weights = safetensors.torch.save(
        _unique_tensors(model.state_dict()), metadata={"lmlab_format": str(CHECKPOINT_FORMAT)}
    )
    write_atomically(out / WEIGHTS_FILE, weights)
    metadata = checkpoint_metadata(model.config, vocab.words, vocab.to_dict())
    write_model_files(out, metadata, config_file=CONFIG_FILE)
    return out


# What an export writes, in either format (a safetensors folder, a transformers one, sharded
# or with a BPE/char tokenizer): a folder holding only these may be exported into again.
EXPORT_FILES = frozenset(
    {
        CONFIG_FILE,
        WEIGHTS_FILE,
        "model.safetensors.index.json",
        VOCAB_FILE,
        TOKENIZER_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "README.md",
    }
)


def check_export_folder(folder: str | Path) -> None:
    """An export goes into a new or empty folder, or over an earlier export; never among other
    files (a run's folder, its checkpoints, a folder of one's own): one line, nothing written."""
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"export folder {folder} is a file; pass a folder path")
    others = (
        sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    )
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(
            f"export folder {folder} holds other files ({shown}); pass a new or empty folder "
            "(an earlier export there may be replaced)"
        )


def check_export_format(export_format: str) -> None:
    if export_format not in EXPORT_FORMATS:
        raise UserError(
            f"export_format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}"
        )


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each shared tensor once (tied `lm_head.weight` is `token_embedding.weight`).

    safetensors refuses shared memory; `safetensors.torch.load_model` restores the tie.
    """
    seen: set[tuple[int, int]] = set()
    unique = {}
    for key, tensor in state.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if where not in seen:
            seen.add(where)
            unique[key] = tensor.contiguous()
    return unique


def _load_export(folder: Path, name: str) -> tuple[torch.nn.Module, Tokenizer]:
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE) if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{name} is not an exported lmlab model: missing {', '.join(missing)}; "
            f"write one with python generate.py ckpt=CKPT export={name}"
        )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        words = json.loads((folder / VOCAB_FILE).read_text()).get("words")
        tokenizer_path = folder / TOKENIZER_FILE
        tokenizer = json.loads(tokenizer_path.read_text()) if tokenizer_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise UserError(
            f"{name}: {CONFIG_FILE}, {VOCAB_FILE} or {TOKENIZER_FILE} is not valid: {error}"
        ) from None
    model, vocab = _build(config, words, tokenizer, name)
    try:
        safetensors.torch.load_model(model, folder / WEIGHTS_FILE, strict=True)
    except (RuntimeError, OSError, safetensors.SafetensorError) as error:
        raise UserError(
            f"{folder / WEIGHTS_FILE} is truncated, corrupted or does not match {CONFIG_FILE}: "
            f"{brief(error)}"
        ) from None
    return model, vocab


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmlab.checkpoint", description="Export an lmlab checkpoint."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export_cmd = commands.add_parser("export", help="write safetensors + JSON into a folder")
    export_cmd.add_argument("source", help="a .ckpt file, an http(s) URL or an exported folder")
    export_cmd.add_argument("folder", help="the folder to write")
    export_cmd.add_argument("--format", default="safetensors", choices=EXPORT_FORMATS)
    args = parser.parse_args(argv)
    model, vocab = load_model(args.source)
    written = export(model, vocab, args.folder, args.format, source=args.source)
    print(f"exported {args.source} to {written}")


if __name__ == "__main__":
    main()
