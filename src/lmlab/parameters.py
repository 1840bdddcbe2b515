"""How many parameters a model has, per part: embeddings, attention, MLP, recurrent, norms."""

from __future__ import annotations

import torch.nn as nn
from rich.table import Table

from lmlab.models import PARTS


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per part: embeddings, attention, mlp, recurrent, norms, other; shared once.

    A parameter belongs to its nearest enclosing attention, MLP or recurrent
    layer (each family's, `lmlab.models.PARTS`), else to its own module's kind
    (embedding, LayerNorm, RMSNorm); anything else (an untied output layer) is
    "other". The tied output layer shares the token embedding and is counted
    with the embeddings.
    """
    counts = dict.fromkeys(("embeddings", *PARTS, "norms", "other"), 0)
    seen: set[int] = set()

    def walk(module: nn.Module, part: str) -> None:
        found = next((name for name, kinds in PARTS.items() if isinstance(module, kinds)), None)
        if found is not None:
            part = found
        elif isinstance(module, nn.Embedding):
            part = "embeddings"
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
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
        if count or part in ("embeddings", "norms"):
            table.add_row(part, f"{count:,}", f"{count / max(total, 1):.1%}")
    table.add_section()
    table.add_row("total", f"{total:,}", "100.0%")
    without = total - counts["embeddings"]
    table.add_row("without embeddings", f"{without:,}", f"{without / max(total, 1):.1%}")
    return table
