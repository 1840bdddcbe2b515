"""How many parameters a model has, per part: embeddings, attention, MLP, norms."""

from __future__ import annotations

import torch.nn as nn
from rich.table import Table

from lmlab.model import MLP, CausalSelfAttention


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per part: embeddings, attention, mlp, norms, other; shared tensors count once.

    A parameter belongs to its nearest enclosing attention or MLP block, else to
    its own module's kind (embedding, LayerNorm); anything else (an untied
    output layer) is "other". The tied output layer shares the token embedding
    and is counted with the embeddings.
    """
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "other"), 0)
    seen: set[int] = set()

    def walk(module: nn.Module, part: str) -> None:
        if isinstance(module, CausalSelfAttention):
            part = "attention"
        elif isinstance(module, MLP):
            part = "mlp"
        elif isinstance(module, nn.Embedding):
            part = "embeddings"
        elif isinstance(module, nn.LayerNorm):
            part = "norms"
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                counts[part] += param.numel()
        for child in module.children():
            walk(child, part)

    walk(model, "other")
    return counts


def parameter_table(model: nn.Module, title: str = "Model parameters") -> Table:
    counts = parameter_counts(model)
    total = sum(counts.values())
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for part, count in counts.items():
        if count or part != "other":
            table.add_row(part, f"{count:,}", f"{count / max(total, 1):.1%}")
    table.add_section()
    table.add_row("total", f"{total:,}", "100.0%")
    without = total - counts["embeddings"]
    table.add_row("without embeddings", f"{without:,}", f"{without / max(total, 1):.1%}")
    return table
