"""Tokenizers: a line of text to ids and back, by words, by characters or by BPE subwords.

All three read a line as its whitespace-separated words, as the corpus files
are split (PTB, WikiText), and end it with `<eos>`; ids 0 and 1 are `<eos>`
and `<unk>` for all three, so the rest of lmlab (decoding, padding, stopping at
`<eos>`) does not care which one a model was trained with. All three decode to
the same text: words joined by single spaces, `<eos>` shown as a word, as the
word tokenizer always showed it (so a continuation stays on one line).

- `word` (`Tokenizer`): one id per word of the training split; any other word
  is `<unk>`. Today's behaviour, id for id.
- `char` (`CharTokenizer`): one id per character of the training split, with
  `BOUNDARY` between the words of a line; a character outside that alphabet
  is `<unk>`.
- `bpe` (`BPETokenizer`): Hugging Face `tokenizers` BPE trained on the
  training split only; a word's last piece carries `SUFFIX`, and a literal
  `<unk>` in the text (PTB and WikiText have them) is the one `<unk>` token.

A tokenizer is data, never code: `to_dict()` is plain JSON values (for BPE,
Hugging Face's own tokenizer JSON) that travel inside the checkpoint beside
the token list, and `tokenizer_from_dict` rebuilds it, so generate.py and
eval.py need nothing but the checkpoint.

`units()` says, per token id, how many words and characters of the text it
stands for; `lmlab.metrics` turns that into word-level perplexity and bits
per character, which compare across tokenizers (docs/datasets.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lmlab.checks import is_positive_int
from lmlab.errors import UserError
from lmlab.vocab import EOS, UNK, Vocabulary, tokenize

KINDS = ("word", "char", "bpe")
BOUNDARY = "▁"  # char: the space between two words of a line (U+2581, as in SentencePiece)
SUFFIX = "</w>"  # bpe: ends the last piece of each word
BATCH = 10_000  # lines per call of the BPE batch encoder


@dataclass(frozen=True)
class Units:
    """How many words and characters of the text each token id stands for.

    Characters are those of each line's words joined by single spaces, plus one
    newline per line (its `<eos>`); a word is a whitespace-separated word, and
    each `<eos>` counts as one more, as in PTB's published perplexities.
    `words[i]`, `chars[i]`: what id i stands for; an `<eos>` right after
    another token (not after an `<eos>`: an empty line) stands for
    `eos_after_token` (words, chars) instead, since the word tokenizer already
    counted the line end in the last word's characters.
    """

    words: list[int]
    chars: list[int]
    eos_after_token: tuple[int, int]


class TokenizerSpec:
    """`conf/tokenizer/*.yaml`: which tokenizer to train on the training split, and its size.

    `vocab_size`: bpe only, tokens in all (`<eos>` and `<unk>` included). A plain
    class, not a dataclass: Hydra would turn a dataclass passed to `instantiate`
    (train.py passes this to the data module) back into a config.
    """

    def __init__(self, kind: str = "word", vocab_size: int | None = None) -> None:
        self.kind = kind
        self.vocab_size = vocab_size
        if self.kind not in KINDS:
            raise UserError(f"tokenizer.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "bpe" and not is_positive_int(self.vocab_size):
            raise UserError(
                f"tokenizer=bpe needs tokenizer.vocab_size, a positive integer; got {self.vocab_size!r}"
            )
        if self.kind != "bpe" and self.vocab_size is not None:
            raise UserError(
                f"tokenizer.vocab_size applies to tokenizer=bpe only; tokenizer={self.kind} takes "
                "every word or character of the training split (drop tokenizer.vocab_size)"
            )

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    def train(self, lines: Sequence[str]) -> Tokenizer:
        """The tokenizer of this kind for a training split's `lines`."""
        if self.kind == "char":
            return CharTokenizer.train(lines)
        if self.kind == "bpe":
            return BPETokenizer.train(lines, self.vocab_size)
        return Tokenizer(Vocabulary.build(lines))


class Tokenizer:
    """The word tokenizer, and the interface of the other two. The id table is a `Vocabulary`."""

    kind = "word"

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab

    # The id table, as `Vocabulary` has it: code that shows or suppresses tokens reads these.
    @property
    def words(self) -> list[str]:
        return self.vocab.words

    @property
    def index(self) -> dict[str, int]:
        return self.vocab.index

    @property
    def eos_id(self) -> int:
        return self.vocab.eos_id

    @property
    def unk_id(self) -> int:
        return self.vocab.unk_id

    def __len__(self) -> int:
        return len(self.vocab)

    def pieces(self, text: str) -> list[str]:
        """The token strings of one line, without its `<eos>`."""
        return text.split()

    def encode(self, text: str) -> list[int]:
        """The ids of one line (a prompt), without its `<eos>`."""
        return self.vocab.encode(self.pieces(text))

    def encode_lines(self, lines: Iterable[str]) -> np.ndarray:
        """Every line's ids, each line ended with `<eos>`, as one int32 array."""
        return np.asarray(
            self.vocab.encode(word for line in lines for word in tokenize(line)), dtype=np.int32
        )

    def decode(self, ids: Iterable[int]) -> str:
        return self.vocab.decode(ids)

    def unknown(self, texts: Iterable[str]) -> list[str]:
        """What of `texts` this tokenizer reads as `<unk>` (words here), in first-seen order."""
        return self.vocab.unknown(piece for text in texts for piece in self.pieces(text))

    def units(self) -> Units:
        # a word stands for itself and the space (or newline) after it; <eos> for an empty line
        chars = [len(w) + 1 for w in self.words]
        chars[self.eos_id] = 1
        return Units([1] * len(self), chars, eos_after_token=(1, 0))

    def to_dict(self) -> dict:
        """Plain JSON values that, with `words`, rebuild this tokenizer (`tokenizer_from_dict`)."""
        return {"kind": self.kind}


class CharTokenizer(Tokenizer):
    """Characters; `BOUNDARY` between the words of a line. `decode(encode(t))` is `t`'s words
    joined by single spaces, with `<unk>` for each character outside the training alphabet."""

    kind = "char"

    @classmethod
    def train(cls, lines: Sequence[str]) -> CharTokenizer:
        counts = Counter()
        for line in lines:
            counts.update(BOUNDARY.join(line.split()))
        ordered = sorted(counts, key=lambda char: (-counts[char], char))
        return cls(Vocabulary([EOS, UNK, *ordered]))

    def pieces(self, text: str) -> list[str]:
        return list(BOUNDARY.join(text.split()))

    def encode_lines(self, lines: Iterable[str]) -> np.ndarray:
        index, unk, eos = self.index, self.unk_id, self.eos_id
        ids: list[int] = []
        for line in lines:
            ids.extend(index.get(char, unk) for char in BOUNDARY.join(line.split()))
            ids.append(eos)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        shown = {self.eos_id: f" {EOS} ", self.unk_id: UNK, self.index.get(BOUNDARY, -1): " "}
        return " ".join("".join(shown.get(i, self.words[i]) for i in ids).split())

    def units(self) -> Units:
        # one character each; the boundary ends a word, an <eos> after a token ends one and is one
        words = [1 if w in (BOUNDARY, EOS) else 0 for w in self.words]
        return Units(words, [1] * len(self), eos_after_token=(2, 1))


def _numbered_in_a_fixed_order(hf):
    """`hf` (a trained tokenizers BPE) with its starting tokens numbered in sorted order.

    The trainer numbers the word-final characters (`e</w>`) in the order of a hash map that
    is seeded anew for every training, so the same lines gave other ids each time (and runs
    with the same seed differed). The merges and their order are deterministic; the merged
    tokens keep their ids, which follow the merges. Renumbering changes no tokenization:
    the model reads its merges by token, not by id.
    """
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    merged = {"".join(m.split(" ") if isinstance(m, str) else m) for m in data["model"]["merges"]}
    special = {token["content"] for token in data["added_tokens"]}
    start = sorted(t for t in vocab if t not in merged and t not in special)
    rest = sorted((t for t in vocab if t in merged or t in special), key=vocab.get)
    specials = len(special)  # they lead `rest` (the lowest ids, as the trainer puts them)
    order = rest[:specials] + start + rest[specials:]
    data["model"]["vocab"] = {token: i for i, token in enumerate(order)}
    return HFTokenizer.from_str(json.dumps(data))


class BPETokenizer(Tokenizer):
    """Byte-pair encoding by Hugging Face `tokenizers`, whole words only (no merge crosses a space).

    Its JSON (`tokenizer.to_str()`) is what the checkpoint carries. Decoding is
    lmlab's own, from the token strings, so that `<unk>` reads as a word.
    """

    kind = "bpe"

    def __init__(self, hf) -> None:  # hf: a tokenizers.Tokenizer
        self.hf = hf
        table = hf.get_vocab()
        words = sorted(table, key=table.get)
        if [table[w] for w in words] != list(range(len(words))):
            raise ValueError("a BPE tokenizer's ids must be 0, 1, 2, ... without gaps")
        super().__init__(Vocabulary(words))

    @classmethod
    def train(cls, lines: Sequence[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        # The alphabet BPE starts from: every character, and every word-final one with SUFFIX.
        counts = Counter(word for line in lines for word in line.split())
        chars = {char for word in counts for char in word}
        finals = {word[-1] for word in counts}
        needed = len(chars) + len(finals) + 2
        if vocab_size < needed:
            raise UserError(
                f"tokenizer.vocab_size={vocab_size} is below the {needed} tokens BPE starts from "
                f"(the training split's {len(chars)} characters, {len(finals)} word-final ones, "
                f"<eos> and <unk>); raise tokenizer.vocab_size to at least {needed}"
            )
        hf = HFTokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=SUFFIX))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, UNK],  # ids 0 and 1, as in every lmlab vocabulary
            end_of_word_suffix=SUFFIX,
            show_progress=False,
        )
        hf.train_from_iterator(lines, trainer, length=len(lines))
        return cls(_numbered_in_a_fixed_order(hf))

    def pieces(self, text: str) -> list[str]:
        return self.hf.encode(text).tokens

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_lines(self, lines: Iterable[str]) -> np.ndarray:
        lines = list(lines)
        ids: list[int] = []
        for start in range(0, len(lines), BATCH):
            for encoding in self.hf.encode_batch(lines[start : start + BATCH]):
                ids.extend(encoding.ids)
                ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        parts = []
        for i in ids:
            token = self.words[i]
            if i in (self.eos_id, self.unk_id):
                parts.append(f" {token} ")
            elif token.endswith(SUFFIX):
                parts.append(token[: -len(SUFFIX)] + " ")
            else:
                parts.append(token)
        return " ".join("".join(parts).split())

    def unknown(self, texts: Iterable[str]) -> list[str]:
        """The characters outside the training alphabet (they become `<unk>`)."""
        alphabet = {c for w in self.words if w not in (EOS, UNK) for c in w.removesuffix(SUFFIX)}
        words = (w for text in texts for w in text.split() if w != UNK)
        return list(dict.fromkeys(c for w in words for c in w if c not in alphabet))

    def units(self) -> Units:
        # A word-final piece ends a word (its space or newline counted with it). `<unk>` is
        # read as a whole word (PTB's and WikiText's literal `<unk>`); a character outside
        # the alphabet is `<unk>` too and then counts as one, a rare approximation.
        words, chars = [], []
        for i, token in enumerate(self.words):
            final = token.endswith(SUFFIX) or i in (self.eos_id, self.unk_id)
            words.append(int(final))
            chars.append(1 if i == self.eos_id else len(token.removesuffix(SUFFIX)) + final)
        return Units(words, chars, eos_after_token=(1, 0))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "hf": json.loads(self.hf.to_str())}


def tokenizer_from_dict(data: dict | None, words: Sequence[str]) -> Tokenizer:
    """The tokenizer that `to_dict()` described, over the id table `words`; None means `word`
    (checkpoints written before tokenizers existed). Raises ValueError when they disagree."""
    kind = (data or {}).get("kind", "word")
    if kind == "word":
        return Tokenizer(Vocabulary(words))
    if kind == "char":
        return CharTokenizer(Vocabulary(words))
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tokenizer = BPETokenizer(HFTokenizer.from_str(json.dumps(data["hf"])))
        except Exception as error:  # the library raises its own exception types
            raise ValueError(f"its BPE tokenizer cannot be read: {error}") from None
        if tokenizer.words != list(words):
            raise ValueError("its BPE tokenizer and its token list differ")
        return tokenizer
    raise ValueError(f"unknown tokenizer kind {kind!r}; this lmlab knows {', '.join(KINDS)}")
