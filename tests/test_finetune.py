"""init_from: weights into a new run, the vocabulary aligned by word; frozen parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from forkserver import ForkServer
from test_checkpoint import evil_checkpoint

from lmlab.checkpoint import export
from lmlab.errors import UserError
from lmlab.finetune import VOCAB_ROWS, copy_weights, freeze, initialise_from
from lmlab.models import build_model
from lmlab.models.gpt import GPTConfig
from lmlab.models.llama import LlamaConfig
from lmlab.models.lstm import LSTMConfig
from lmlab.tokenizers import CharTokenizer, Tokenizer
from lmlab.vocab import Vocabulary

from conftest import (
    quiet_trainer,
    random_batches,
    tiny_gpt_module,
    tiny_overrides,
    write_corpus,
)

SOURCE_WORDS = ["<eos>", "<unk>", "the", "company", "said", "a", "b", "c", "d", "only_a"]
# shared words in another order, two words the source never saw, one it had left out
TARGET_WORDS = ["<eos>", "<unk>", "d", "said", "new1", "the", "b", "company", "a", "c", "new2"]
TARGET = Tokenizer(Vocabulary(TARGET_WORDS))
CONFIGS = {
    "gpt": dict(cls=GPTConfig, n_layer=1, n_head=2, n_embd=8, block_size=8),
    "llama": dict(cls=LlamaConfig, n_layer=1, n_head=2, n_embd=8, tie_embeddings=False),
    "lstm": dict(cls=LSTMConfig, n_layer=1, n_embd=8, n_hidden=8, tie_weights=False),
}


def model_of(family: str, words: list[str], seed: int, **changes) -> torch.nn.Module:
    values = {**CONFIGS[family], **changes}
    torch.manual_seed(seed)
    return build_model(values.pop("cls")(vocab_size=len(words), **values))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_alignment_keeps_exactly_the_shared_words_rows(family):
    source = model_of(family, SOURCE_WORDS, seed=0)
    target = model_of(family, TARGET_WORDS, seed=1)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    alignment = copy_weights(target, TARGET_WORDS, source, SOURCE_WORDS)
    assert (alignment.kept, alignment.new, alignment.dropped) == (9, 2, 1)

    trained, now = source.state_dict(), target.state_dict()
    rows = [name for name in VOCAB_ROWS if name in now]
    assert "lm_head.weight" in rows and (family != "lstm" or "lm_head.bias" in rows)
    for name in rows:
        for i, word in enumerate(TARGET_WORDS):
            expected = (
                trained[name][SOURCE_WORDS.index(word)] if word in SOURCE_WORDS else fresh[name][i]
            )
            assert torch.equal(now[name][i], expected), (name, word)
    for name, value in now.items():
        if name not in VOCAB_ROWS:
            assert torch.equal(value, trained[name]), name


def test_init_from_checks_what_the_weights_mean(tmp_path):
    """docs/failures.md lists the refusals train.py makes; here what only a direct call shows."""
    exported = export(
        model_of("gpt", SOURCE_WORDS, seed=0), Tokenizer(Vocabulary(SOURCE_WORDS)), tmp_path / "e"
    )
    evil, marker = evil_checkpoint(tmp_path, "zip")
    with pytest.raises(UserError, match=r"holds pickled code or objects"):
        initialise_from(model_of("gpt", TARGET_WORDS, 1), TARGET, str(evil))
    assert not marker.exists()  # refused without running it
    with pytest.raises(
        UserError,
        match=r"model.block_size is 8 there, 16 here \(model.block_size follows data.seq_len\)",
    ):
        initialise_from(model_of("gpt", TARGET_WORDS, 1, block_size=16), TARGET, str(exported))
    # what may differ: the regularisers, and for rotary positions the training window
    target = model_of("gpt", TARGET_WORDS, 1, dropout=0.3)
    assert initialise_from(target, TARGET, str(exported)).kept == 9
    llama = model_of("llama", SOURCE_WORDS, 0)
    llama_export = export(llama, Tokenizer(Vocabulary(SOURCE_WORDS)), tmp_path / "llama")
    target = model_of("llama", TARGET_WORDS, 1, block_size=128)
    assert initialise_from(target, TARGET, str(llama_export)).new == 2
    # from a transformers folder: the same weights as from lmlab's own export
    hf_folder = export(llama, Tokenizer(Vocabulary(SOURCE_WORDS)), tmp_path / "hf", "hf")
    from_hf = model_of("llama", TARGET_WORDS, 1, block_size=128)
    assert initialise_from(from_hf, TARGET, f"hf:{hf_folder}").kept == 9
    chars = CharTokenizer.train(["the company said"])
    with pytest.raises(
        UserError, match=r"trained with tokenizer=word, this run uses tokenizer=char"
    ):
        initialise_from(model_of("gpt", chars.words, 1), chars, str(exported))
    for (name, ours), theirs in zip(target.state_dict().items(), from_hf.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_init_from_a_char_model_counts_characters(tmp_path):
    source_chars = CharTokenizer.train(["the company said"])
    target_chars = CharTokenizer.train(["the company sold"])  # l is new, i goes
    source = model_of("gpt", source_chars.words, seed=0)
    exported = export(source, source_chars, tmp_path / "chars")
    alignment = initialise_from(model_of("gpt", target_chars.words, 1), target_chars, str(exported))
    assert alignment.unit == "characters"
    assert alignment.describe("X") == (
        f"init_from X: {alignment.kept} characters keep their trained rows, 1 new characters "
        f"freshly initialised (1 characters of the source not in this corpus)"
    )


def test_frozen_parameters_do_not_train(tmp_path):
    module = tiny_gpt_module(vocab=20, lr=1e-2)
    frozen = freeze(module.model, ["blocks.0.attn.*", "position_embedding.weight"])
    assert frozen == [
        "position_embedding.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias",
    ]
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    quiet_trainer(tmp_path, [], max_steps=3).fit(module, random_batches(3, 20, seed=0))
    after = module.model.state_dict()
    for name in before:
        assert torch.equal(after[name], before[name]) == (name in frozen), name

    with pytest.raises(UserError, match=r"pattern 'blocks.9.\*' matches no parameter; names look"):
        freeze(module.model, ["blocks.9.*"])
    with pytest.raises(UserError, match=r"freezes every parameter; nothing trains"):
        freeze(module.model, ["*"])


def read_ppl(run: Path) -> float:
    return json.loads((run / "result.json").read_text())["best_val_ppl"]


@pytest.mark.slow
def test_fine_tuning_beats_training_from_scratch(trained_run, tmp_path, cache_dir):
    """Pre-trained on corpus A (trained_run), one epoch of a related corpus B from those
    weights reaches a lower val ppl on B than the same epoch from fresh weights."""
    corpus_b = write_corpus(tmp_path / "b", seed=1, lines=(120, 60, 10))
    with (corpus_b / "ptb.train.txt").open("a") as f:
        f.write(" x1 x2 the company said x3 \n")  # three words corpus A never had
    source = trained_run / "checkpoints" / "best.ckpt"
    runs = {}
    server = ForkServer("train.py", tmp_path)  # imports once for both runs
    try:
        for name, extra in (("finetuned", [f"init_from={source}"]), ("scratch", [])):
            runs[name] = tmp_path / name
            overrides = [
                *tiny_overrides(corpus_b, cache_dir, runs[name]),
                "trainer.max_epochs=1",
                "test=false",
                "callbacks.samples=null",
                "logger=none",
                *extra,
            ]
            done = server.run(*overrides)
            assert done.returncode == 0, done.stderr[-2000:]
    finally:
        server.close()
    log = (runs["finetuned"] / "train.log").read_text()
    words_b = Vocabulary.build((corpus_b / "ptb.train.txt").read_text().splitlines()).words
    words_a = json.loads((trained_run / "checkpoints" / "vocab.json").read_text())["words"]
    kept = len(set(words_a) & set(words_b))
    assert f"init_from {source}: {kept} words keep their trained rows, 3 new words" in log
    assert read_ppl(runs["finetuned"]) < read_ppl(runs["scratch"])
    steps = [json.loads((r / "result.json").read_text())["steps"] for r in runs.values()]
    assert steps[0] == steps[1]  # a new run from step 0, not a continuation
