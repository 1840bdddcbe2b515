"""Hugging Face transformers: write an lmlab model as a transformers folder, and read one back.

`export_hf` writes what `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load offline: `config.json`,
`generation_config.json`, `model.safetensors`, the tokenizer files and a
README.md model card. `gpt` becomes `GPT2LMHeadModel` (exact GELU:
`activation_function="gelu"`; GPT-2's Conv1D stores its weights transposed
against `nn.Linear`), `llama` becomes `LlamaForCausalLM` (lmlab's RoPE already
rotates halves as Hugging Face does, so no permutation of q and k). The `lstm`
family has no transformers class. The tokenizer is a word-level one for
`tokenizer=word` and, for `tokenizer=bpe`, the BPE tokenizer the checkpoint
carries (Hugging Face's own JSON already), for `tokenizer=char` a character-level
one.

`import_hf` reads such a folder back (any GPT-2 or Llama folder whose shape
lmlab's families can hold, with a word-level tokenizer or lmlab's char or BPE) as data
only: JSON and safetensors, no code runs and transformers is not needed.
Export then import then export gives the same weight bytes, and the same
tokenizer.

Only this module imports transformers, and only inside `export_hf`, so the
rest of lmlab works without the `hf` extra.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from lmlab.atomic import write_atomically
from lmlab.download import is_url
from lmlab.errors import UserError, brief
from lmlab.models import build_model, config_from_dict
from lmlab.tokenizers import (
    BOUNDARY,
    SUFFIX,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    tokenizer_from_dict,
)
from lmlab.vocab import EOS, UNK, Vocabulary

PREFIX = "hf:"  # init_from=hf:DIR, ckpt=hf:DIR
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "README.md"

# (lmlab name, Hugging Face name, stored transposed): per layer, then for the whole model.
_GPT_LAYER = [
    ("ln_attn.weight", "ln_1.weight", False),
    ("ln_attn.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_mlp.weight", "ln_2.weight", False),
    ("ln_mlp.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
]
_GPT_TOP = [
    ("token_embedding.weight", "transformer.wte.weight", False),
    ("position_embedding.weight", "transformer.wpe.weight", False),
    ("ln_final.weight", "transformer.ln_f.weight", False),
    ("ln_final.bias", "transformer.ln_f.bias", False),
]
_LLAMA_LAYER = [
    ("norm_attn.weight", "input_layernorm.weight", False),
    ("attn.q.weight", "self_attn.q_proj.weight", False),
    ("attn.k.weight", "self_attn.k_proj.weight", False),
    ("attn.v.weight", "self_attn.v_proj.weight", False),
    ("attn.proj.weight", "self_attn.o_proj.weight", False),
    ("norm_mlp.weight", "post_attention_layernorm.weight", False),
    ("mlp.gate.weight", "mlp.gate_proj.weight", False),
    ("mlp.up.weight", "mlp.up_proj.weight", False),
    ("mlp.down.weight", "mlp.down_proj.weight", False),
]
_LLAMA_TOP = [
    ("token_embedding.weight", "model.embed_tokens.weight", False),
    ("norm_final.weight", "model.norm.weight", False),
]
_LAYER_PREFIX = {
    "gpt": ("transformer.h.{}.", _GPT_LAYER),
    "llama": ("model.layers.{}.", _LLAMA_LAYER),
}
_TOP = {"gpt": _GPT_TOP, "llama": _LLAMA_TOP}
_MODEL_TYPES = {"gpt2": "gpt", "llama": "llama"}  # Hugging Face model_type -> lmlab family
_ARCHITECTURES = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}

# What transformers assumes when config.json leaves a field out (its config classes' defaults).
_GPT2_DEFAULTS = {
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "tie_word_embeddings": True,
}
_LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "head_dim": None,
}
_LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which lmlab's gpt uses


# ---------------------------------------------------------------------------
# Weights: lmlab's names and layout <-> Hugging Face's.


def _name_pairs(config: Any) -> list[tuple[str, str, bool]]:
    family = config.family
    prefix, layer = _LAYER_PREFIX[family]
    pairs = list(_TOP[family])
    for i in range(config.n_layer):
        pairs += [(f"blocks.{i}.{ours}", prefix.format(i) + theirs, t) for ours, theirs, t in layer]
    if family == "llama" and not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def to_hf_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under Hugging Face's names and layout (tied output layer left out).

    A gpt model without biases (`model.bias=false`) gets zero biases: GPT-2 always has them,
    and zeros compute the same.
    """
    state = model.state_dict()
    out = {}
    for ours, theirs, transposed in _name_pairs(model.config):
        if ours in state:
            tensor = state[ours]
        else:  # a bias lmlab left out: the length of its weight's rows
            weight = state[ours.replace(".bias", ".weight")]
            tensor = weight.new_zeros(weight.shape[0])
        out[theirs] = (tensor.t() if transposed else tensor).contiguous()
    return out


def from_hf_state(
    config: Any, weights: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """The lmlab state dict of `config`'s model from Hugging Face `weights`."""
    # original GPT-2 files name their tensors without the `transformer.` prefix
    if config.family == "gpt" and not any(k.startswith("transformer.") for k in weights):
        weights = {
            f"transformer.{k}" if k != "lm_head.weight" else k: v for k, v in weights.items()
        }
    state = {}
    for ours, theirs, transposed in _name_pairs(config):
        if theirs not in weights:
            raise UserError(f"{name} has no weight {theirs}; it is not a complete model")
        tensor = weights[theirs]
        state[ours] = tensor.t().contiguous() if transposed else tensor
    state["lm_head.weight"] = state.get("lm_head.weight", state["token_embedding.weight"])
    return state


# ---------------------------------------------------------------------------
# Configs.


def hf_config_values(config: Any) -> dict[str, Any]:
    """The transformers config arguments for an lmlab model config (gpt or llama)."""
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # `<eos>` is id 0
    if config.family == "gpt":
        return {
            "vocab_size": config.vocab_size,
            "n_positions": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.mlp_ratio * config.n_embd,
            "activation_function": "gelu",  # lmlab's gpt computes the exact GELU
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.attention_dropout,
            "layer_norm_epsilon": _LAYER_NORM_EPS,
            "tie_word_embeddings": True,
            **special,
        }
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.attn_dropout,
        **special,
    }


def _gpt_from_hf(values: dict[str, Any], name: str) -> dict[str, Any]:
    v = {**_GPT2_DEFAULTS, **values}
    refuse = {
        "activation_function": (
            v["activation_function"] == "gelu",
            "lmlab's gpt computes the exact GELU ('gelu')",
        ),
        "layer_norm_epsilon": (
            math.isclose(v["layer_norm_epsilon"], _LAYER_NORM_EPS),
            f"lmlab's gpt uses LayerNorm eps {_LAYER_NORM_EPS}",
        ),
        "tie_word_embeddings": (
            v["tie_word_embeddings"] is True,
            "lmlab's gpt ties its output layer",
        ),
        "scale_attn_weights": (
            v["scale_attn_weights"] is True,
            "lmlab scales attention by 1/sqrt(head_dim)",
        ),
        "scale_attn_by_inverse_layer_idx": (
            v["scale_attn_by_inverse_layer_idx"] is False,
            "lmlab does not scale attention by layer",
        ),
    }
    _refuse_unmatched(refuse, v, name)
    n_inner = v["n_inner"] or 4 * v["n_embd"]
    if n_inner % v["n_embd"]:
        raise UserError(
            f"{name} has n_inner={n_inner}, not a multiple of n_embd={v['n_embd']}; "
            "lmlab's gpt has an MLP of mlp_ratio x n_embd"
        )
    return {
        "family": "gpt",
        "vocab_size": v["vocab_size"],
        "block_size": v["n_positions"],
        "n_layer": v["n_layer"],
        "n_head": v["n_head"],
        "n_embd": v["n_embd"],
        "mlp_ratio": n_inner // v["n_embd"],
        "dropout": v["resid_pdrop"],
        "attn_dropout": v["attn_pdrop"],
        "bias": True,
    }


def _llama_from_hf(values: dict[str, Any], name: str) -> dict[str, Any]:
    v = {**_LLAMA_DEFAULTS, **values}
    rope = v.get("rope_parameters") or v.get("rope_scaling") or {}
    theta = rope.get("rope_theta", v.get("rope_theta", 10_000.0))
    heads = v["num_attention_heads"]
    refuse = {
        "hidden_act": (v["hidden_act"] == "silu", "lmlab's llama uses SwiGLU with silu"),
        "attention_bias": (v["attention_bias"] is False, "lmlab's llama has no biases"),
        "mlp_bias": (v["mlp_bias"] is False, "lmlab's llama has no biases"),
        "rope type": (
            rope.get("rope_type", rope.get("type", "default")) == "default",
            "lmlab's llama has plain RoPE, without scaling",
        ),
        "head_dim": (
            v["head_dim"] in (None, v["hidden_size"] // heads),
            "lmlab's llama has head_dim = hidden_size / num_attention_heads",
        ),
    }
    _refuse_unmatched(refuse, {**v, "rope type": rope.get("rope_type")}, name)
    return {
        "family": "llama",
        "vocab_size": v["vocab_size"],
        "block_size": v["max_position_embeddings"],
        "n_layer": v["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": v["num_key_value_heads"] or heads,
        "n_embd": v["hidden_size"],
        "mlp_hidden": v["intermediate_size"],
        "dropout": 0.0,  # Llama has no dropout but on attention weights
        "attn_dropout": v["attention_dropout"],
        "rope_theta": float(theta),
        "norm_eps": v["rms_norm_eps"],
        "tie_embeddings": bool(v["tie_word_embeddings"]),
    }


def _refuse_unmatched(checks: dict[str, tuple[bool, str]], values: dict, name: str) -> None:
    for key, (ok, why) in checks.items():
        if not ok:
            raise UserError(f"{name} has {key}={values.get(key)!r}: {why}; it cannot be imported")


# ---------------------------------------------------------------------------
# The tokenizer: lmlab's tokenizer <-> a tokenizers-library tokenizer.


def hf_tokenizer(vocab: Tokenizer, max_length: int | None) -> Any:
    """A `PreTrainedTokenizerFast` that encodes text to exactly lmlab's ids.

    One backend per lmlab kind (`_BACKENDS`, the one place a new tokenizer kind
    gets its export). In each `<unk>` is the unknown token, and `<eos>` is both
    the end of a sentence and, prepended by the post-processor, the start of a
    prompt: lmlab feeds every prompt after an `<eos>`, as each sentence follows
    one in training.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = _BACKENDS[vocab.kind](vocab)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, vocab.eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        model_max_length=max_length or 1_000_000,
        clean_up_tokenization_spaces=False,
        # a char model reads a literal `<unk>` in the text as its five characters
        split_special_tokens=vocab.kind == "char",
    )


def _word_backend(vocab: Tokenizer) -> Any:
    """A `WordLevel` model over lmlab's words. Each word decodes with its leading space (as
    GPT-2's byte-level tokens carry theirs), so text decoded from new tokens alone, as
    transformers' pipeline does, joins its prompt with a space."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.WordLevel(dict(vocab.index), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Replace(Regex("^"), " ")
    return backend


def _char_backend(vocab: Tokenizer) -> Any:
    """A `WordLevel` model over lmlab's characters, read as `CharTokenizer` reads a line: its
    words joined by one `BOUNDARY`, each character a token. Decoding turns `BOUNDARY` back
    into a space and gives `<eos>` the spaces of a word, as `CharTokenizer.decode` does."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.WordLevel(dict(vocab.index), unk_token=UNK))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Strip(), normalizers.Replace(Regex(r"\s+"), BOUNDARY)]
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(BOUNDARY, " "),
            decoders.Replace(Regex(f"^{EOS}$"), f" {EOS} "),
            *_joined_by_single_spaces(),
        ]
    )
    return backend


def _joined_by_single_spaces() -> list[Any]:
    """The decoders that end each of lmlab's decodes: `" ".join(text.split())`."""
    from tokenizers import Regex, decoders

    return [decoders.Fuse(), decoders.Replace(Regex(" {2,}"), " "), decoders.Strip(" ", 1, 1)]


def _bpe_backend(vocab: BPETokenizer) -> Any:
    """The BPE tokenizer the checkpoint carries (its JSON: vocabulary, merges, `<eos>` and
    `<unk>` as special tokens, whitespace split), with a decoder that gives
    `BPETokenizer.decode`'s text: a word's last piece (`</w>`) ends the word, `<eos>` and
    `<unk>` stand as words, words joined by single spaces."""
    from tokenizers import Regex, decoders
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(vocab.hf.to_str())
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(Regex(f"^{EOS}$"), f" {EOS} "),  # a whole token, not a piece's text
            decoders.Replace(Regex(f"^{UNK}$"), f" {UNK} "),
            decoders.Replace(Regex(f"{SUFFIX}$"), " "),
            *_joined_by_single_spaces(),
        ]
    )
    return backend


_BACKENDS = {"word": _word_backend, "char": _char_backend, "bpe": _bpe_backend}


def tokenizer_from_folder(folder: Path, name: str) -> Tokenizer:
    """lmlab's tokenizer from a folder's `tokenizer.json` (read as JSON: no code runs).

    A word-level one (`WordLevel` split on whitespace, or, split into characters,
    `_char_backend`'s) or a BPE one as lmlab writes it (`_bpe_backend`). The one
    place a new tokenizer kind gets its import.
    """
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{name} has no {TOKENIZER_FILE}; lmlab needs the model's tokenizer")
    try:
        data = json.loads(path.read_text())
        model = data["model"]
        kind = model.get("type")
        ids = model.get("vocab") or {}
        words = sorted(ids, key=ids.get)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not a valid tokenizers file: {error}") from None
    if kind not in ("WordLevel", "BPE"):
        raise UserError(
            f"{path} is a {kind} tokenizer; lmlab reads word-level (WordLevel) tokenizers and "
            "the BPE ones it writes"
        )
    if [ids[w] for w in words] != list(range(len(words))):
        raise UserError(f"{path}: the token ids are not 0, 1, 2, ...")
    if kind == "BPE":
        return _bpe_from_hf(data, words, path)
    by_character = (data.get("pre_tokenizer") or {}).get("type") == "Split"
    try:
        return (CharTokenizer if by_character else Tokenizer)(Vocabulary(words))
    except ValueError as error:
        raise UserError(f"{path}: {error} (lmlab's word ids 0 and 1)") from None


def _bpe_from_hf(data: dict, words: list[str], path: Path) -> BPETokenizer:
    """lmlab's `BPETokenizer` from the JSON `_bpe_backend` wrote: that JSON without the
    post-processor and decoder it added (lmlab encodes a line without `<eos>` and decodes
    by itself), so the tokenizer is again the one the checkpoint carried."""
    lmlab_made = (
        data["model"].get("end_of_word_suffix") == SUFFIX
        and data.get("pre_tokenizer") == {"type": "WhitespaceSplit"}
        and data.get("normalizer") is None
    )
    if not lmlab_made:
        raise UserError(
            f"{path} is a BPE tokenizer lmlab did not write (lmlab's splits on whitespace, "
            f"without a normalizer, and ends a word's last piece with {SUFFIX}); lmlab reads "
            "word-level tokenizers and its own BPE"
        )
    carried = {"kind": "bpe", "hf": {**data, "post_processor": None, "decoder": None}}
    try:
        return tokenizer_from_dict(carried, words)
    except ValueError as error:
        raise UserError(f"{path}: {error} (lmlab's token ids 0 and 1 are <eos>, <unk>)") from None


# ---------------------------------------------------------------------------
# Export.


def export_hf(
    model: nn.Module, vocab: Tokenizer, folder: str | Path, source: str | None = None
) -> Path:
    """Write `model` and its tokenizer as a transformers folder; return the folder."""
    family = model.config.family
    if family not in _ARCHITECTURES:
        raise UserError(
            f"the {family} family has no transformers class; export it with "
            "export_format=safetensors (the default), or export a gpt or llama model"
        )
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"export folder {folder} is a file; pass a folder path")
    try:
        from transformers import GenerationConfig, GPT2Config, LlamaConfig
    except ImportError:
        raise UserError('export_format=hf needs transformers: pip install -e ".[hf]"') from None
    config_class = GPT2Config if family == "gpt" else LlamaConfig
    config = config_class(**hf_config_values(model.config))
    config.architectures = [_ARCHITECTURES[family]]
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0).save_pretrained(out)
    write_atomically(out / WEIGHTS_FILE, _weights_bytes(model))
    hf_tokenizer(vocab, model.max_context).save_pretrained(out)
    write_atomically(out / CARD_FILE, model_card(model, vocab, source, out))
    return out


def _weights_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().cpu() for k, v in to_hf_state(model).items()}
    return safetensors.torch.save(state, metadata={"format": "pt"})


# transformers' pipeline decodes the new tokens alone: a word's space is at its end (bpe) or is
# a token of its own (char), so the first new word is appended to the prompt without it.
_GLUED = (
    " The pipeline appends the text of the new tokens to the prompt, which loses the space "
    "between the prompt and the first new word; `tokenizer.decode` of the whole sequence gives "
    "lmlab's text."
)
# What the model card says of each exported tokenizer kind: its tag, what it is, how it reads text.
_CARD_TOKENIZER = {
    "word": (
        "word-level",
        "a word-level tokenizer of {size:,} words",
        "Text is lower-case words split on spaces, as in the training corpus.",
    ),
    "char": (
        "character-level",
        "a character tokenizer of {size:,} characters (`▁` between words)",
        "Text is read character by character, `▁` between words; a character the training "
        "text did not have is `<unk>`." + _GLUED,
    ),
    "bpe": (
        "bpe",
        "lmlab's BPE tokenizer of {size:,} tokens (no merge across words)",
        "Text is split on spaces, each word into BPE pieces; a character the training text "
        "did not have is `<unk>`." + _GLUED,
    ),
}


def model_card(model: nn.Module, vocab: Tokenizer, source: str | None, folder: Path) -> str:
    """README.md: what the model is, what it was trained on, how well, and how to use it."""
    config = model.config
    tag, tokenizer, reads = _CARD_TOKENIZER[vocab.kind]
    run = _run_record(source)
    data = run.get("data") or "not recorded beside the checkpoint"
    metrics = run.get("metrics") or "not recorded beside the checkpoint"
    size = sum(p.numel() for p in model.parameters())
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [lmlab, {config.family}, {tag}]
---

# {folder.name}

A {config.family} language model trained with lmlab, exported as
`{_ARCHITECTURES[config.family]}` with {tokenizer.format(size=len(vocab))}
(`<eos>` id 0 ends sentences and starts prompts, `<unk>` id 1).
Layers: {config.n_layer}, width {config.n_embd}, {size:,} parameters, context {config.block_size}.

- Data: {data}
- Metrics: {metrics}
- Checkpoint: {source or "not recorded"}
- Command: `python generate.py ckpt={source or "CKPT"} export={folder} export_format=hf`

```python
from transformers import pipeline

pipe = pipeline("text-generation", model="{folder}")
print(pipe("the company said", add_special_tokens=True, max_new_tokens=20)[0]["generated_text"])
```

`add_special_tokens=True` puts `<eos>` before the prompt, as lmlab's own
`generate.py` does. {reads} `<unk>` is the tokenizer's unknown token, so text decoded with
`skip_special_tokens=True` (the pipeline's default) leaves it out.

Model config (lmlab): `{json.dumps(config.to_dict())}`
"""


def _run_record(source: str | None) -> dict[str, str]:
    """Data and metrics from the run folder of a checkpoint (RUN/checkpoints/X.ckpt), if any.

    The card only informs: a record that is missing or does not parse is left out.
    """
    if not source or is_url(source):
        return {}
    run = Path(str(source).removeprefix(PREFIX)).expanduser().resolve().parent.parent
    found = {}
    try:
        data = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml").data)
        files = data.get("files") or {}
        found["data"] = (
            f"`{data.get('data_dir')}`"
            + (f" ({', '.join(f'{k}: {v}' for k, v in files.items())})" if files else "")
            + f", seq_len {data.get('seq_len')}"
        )
    except Exception:  # no run folder, or a config without data: not recorded
        pass
    try:
        result = json.loads((run / "result.json").read_text())
        shown = {k: result.get(k) for k in ("best_val_ppl", "test_ppl", "steps")}
        found["metrics"] = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()
        )
    except Exception:
        pass
    return found


# ---------------------------------------------------------------------------
# Import.


def is_hf_folder(path: Path) -> bool:
    """Whether `path` is a transformers folder (its config.json names a model_type)."""
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def import_hf(source: str | Path) -> tuple[nn.Module, Tokenizer]:
    """The lmlab model (eval mode, CPU) and tokenizer of a local transformers folder."""
    name = str(source)
    folder = Path(name.removeprefix(PREFIX)).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"{name} is not a folder; pass hf:DIR, a local transformers folder of a GPT-2 "
            "or Llama model (config.json, model.safetensors, tokenizer.json)"
        )
    try:
        values = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{name} has no readable {CONFIG_FILE}: {error}") from None
    model_type = values.get("model_type") if isinstance(values, dict) else None
    readers: dict[str, Callable[[dict, str], dict]] = {"gpt": _gpt_from_hf, "llama": _llama_from_hf}
    if model_type not in _MODEL_TYPES:
        raise UserError(
            f"{name} is a {model_type!r} model; lmlab imports gpt2 (family gpt) and llama "
            "(family llama) folders"
        )
    family = _MODEL_TYPES[model_type]
    try:
        config = config_from_dict(readers[family](values, name))
    except (TypeError, ValueError, KeyError) as error:
        raise UserError(
            f"{name}: {CONFIG_FILE} does not give a valid {family} model: {error}"
        ) from None
    vocab = tokenizer_from_folder(folder, name)
    if len(vocab) != config.vocab_size:
        raise UserError(
            f"{name}: the tokenizer has {len(vocab)} tokens but vocab_size is {config.vocab_size}"
        )
    model = build_model(config)
    try:
        model.load_state_dict(from_hf_state(config, _read_weights(folder, name), name))
    except RuntimeError as error:
        raise UserError(f"{name}: the weights do not match {CONFIG_FILE}: {brief(error)}") from None
    return model.eval(), vocab


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s); pickled weight files are refused."""
    files = [folder / WEIGHTS_FILE]
    if not files[0].is_file() and (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text()).get("weight_map", {})
        files = [folder / f for f in dict.fromkeys(index.values())]
    if not all(f.is_file() for f in files):
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = (
            f" ({', '.join(pickled)} is pickled and never loaded: save it with "
            "save_pretrained(DIR, safe_serialization=True))"
            if pickled
            else ""
        )
        raise UserError(f"{name} has no {WEIGHTS_FILE}{hint}")
    weights = {}
    for path in files:
        try:
            weights.update(safetensors.torch.load_file(path))
        except (OSError, safetensors.SafetensorError) as error:
            raise UserError(f"{path} is truncated or corrupted: {error}") from None
    return weights
