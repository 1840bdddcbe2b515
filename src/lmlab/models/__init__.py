"""The model families, one file each, behind one interface (`lmlab.models.interface`).

    gpt.py    GPT-2-style Transformer (learned positions, LayerNorm, GELU MLP)
    llama.py  Llama-style Transformer (RoPE, RMSNorm, SwiGLU, grouped-query attention)
    lstm.py   multi-layer LSTM with the AWD-LSTM regularisers

`build_model(config)` makes the network for any family's config;
`config_from_dict(values)` reads a config back from a checkpoint (a dict without
`family` is a `gpt` config: checkpoints from before the families existed).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from lmlab.models import gpt, llama, lstm
from lmlab.models.interface import FAMILIES

ModelConfig = gpt.GPTConfig | llama.LlamaConfig | lstm.LSTMConfig

_FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (gpt.GPTConfig, gpt.GPTLM),
    "llama": (llama.LlamaConfig, llama.LlamaLM),
    "lstm": (lstm.LSTMConfig, lstm.LSTMLM),
}
assert tuple(_FAMILIES) == FAMILIES

# Every named size, for the benchmarks and for tests that keep conf/model/ in step.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: ("gpt", values) for name, values in gpt.PRESETS.items()},
    **{name: ("llama", values) for name, values in llama.PRESETS.items()},
    **{name: ("lstm", values) for name, values in lstm.PRESETS.items()},
}

# The blocks FSDP shards and activation checkpointing recomputes, one unit each.
BLOCKS: tuple[type[nn.Module], ...] = (gpt.Block, llama.Block)

# The parts a parameter table counts apart, by the modules that hold them.
PARTS: dict[str, tuple[type[nn.Module], ...]] = {
    "attention": (gpt.CausalSelfAttention, llama.Attention),
    "mlp": (gpt.MLP, llama.SwiGLU),
    "recurrent": (nn.LSTM,),
}


def config_class(family: str) -> type:
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; lmlab has {', '.join(FAMILIES)}")
    return _FAMILIES[family][0]


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """The config a checkpoint (or export) carries; raises ValueError or TypeError if invalid."""
    family = values.get("family", "gpt")
    if not isinstance(family, str):
        raise ValueError(f"model family must be a name, got {family!r}")
    return config_class(family)(**{**values, "family": family})


def preset(name: str, vocab_size: int, block_size: int) -> ModelConfig:
    """The config of a named size (conf/model/NAME.yaml), for benchmarks and tests."""
    family, values = PRESETS[name]
    return config_class(family)(vocab_size=vocab_size, block_size=block_size, **values)


def build_model(config: ModelConfig) -> nn.Module:
    """The network of `config`'s family, freshly initialised."""
    for config_type, model_type in _FAMILIES.values():
        if type(config) is config_type:
            return model_type(config)
    raise TypeError(f"{type(config).__name__} is not a model config of lmlab's families")
