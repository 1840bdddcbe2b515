"""Word-level vocabulary: build from a training split, encode, decode, JSON."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmlab.atomic import write_atomically

EOS = "<eos>"
UNK = "<unk>"


def tokenize(line: str) -> list[str]:
    """Split one line the way Mikolov's PTB files are split, ending it with `<eos>`."""
    return line.split() + [EOS]


class Vocabulary:
    """An ordered word list; a word's id is its index. `<eos>` is 0 and `<unk>` is 1."""

    def __init__(self, words: Sequence[str]) -> None:
        if len(words) < 2 or words[0] != EOS or words[1] != UNK:
            raise ValueError(f"a vocabulary starts with {EOS!r}, {UNK!r}; got {list(words[:2])}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary lists each word once; found duplicates")
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}
        self.eos_id = 0
        self.unk_id = 1

    @classmethod
    def build(cls, lines: Iterable[str]) -> Vocabulary:
        """Every word of `lines`, most frequent first; ties in alphabetical order."""
        counts = Counter(word for line in lines for word in line.split())
        counts.pop(EOS, None)
        counts.pop(UNK, None)
        ordered = sorted(counts, key=lambda word: (-counts[word], word))
        return cls([EOS, UNK, *ordered])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: Iterable[str]) -> list[int]:
        """Ids of `words`; words outside the vocabulary become `<unk>`."""
        index, unk = self.index, self.unk_id
        return [index.get(word, unk) for word in words]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def unknown(self, words: Iterable[str]) -> list[str]:
        """The words that `encode` would map to `<unk>`, in first-seen order."""
        return list(dict.fromkeys(w for w in words if w not in self.index))

    def save(self, path: str | Path) -> None:
        """`{"words": [...]}` as JSON, written atomically."""
        write_atomically(path, json.dumps({"words": self.words}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls(json.loads(Path(path).read_text())["words"])
