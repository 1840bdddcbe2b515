"""lmlab: train Transformer language models on Penn Treebank, decode from their checkpoints."""

__version__ = "0.1.0"
