"""init_from: weights into a new run, the vocabulary aligned by word; frozen parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_checkpoint import evil_checkpoint

from lmlab.checkpoint import export
from lmlab.errors import UserError
from lmlab.finetune import VOCAB_ROWS, copy_weights, freeze, initialise_from
from lmlab.models import build_model
from lmlab.models.gpt import GPTConfig
from lmlab.models.llama import LlamaConfig
from lmlab.models.lstm import LSTMConfig
from lmlab.resume import resume_argv
from lmlab.vocab import Vocabulary

from conftest import (
    fixture_data,
    quiet_trainer,
    random_batches,
    run_entry_point,
    tiny_gpt_module,
    tiny_overrides,
    write_corpus,
)

SOURCE_WORDS = ["<eos>", "<unk>", "the", "company", "said", "a", "b", "c", "d", "only_a"]
# shared words in another order, two words the source never saw, one it had left out
TARGET_WORDS = ["<eos>", "<unk>", "d", "said", "new1", "the", "b", "company", "a", "c", "new2"]
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


def test_init_from_refuses_what_it_cannot_use(tmp_path):
    gpt = model_of("gpt", SOURCE_WORDS, seed=0)
    exported = export(gpt, Vocabulary(SOURCE_WORDS), tmp_path / "exported")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip file")
    evil, marker = evil_checkpoint(tmp_path, "zip")
    rows = [
        (
            model_of("gpt", TARGET_WORDS, 1),
            str(tmp_path / "absent.ckpt"),
            r"absent.ckpt not found; pass a .ckpt",
        ),
        (model_of("gpt", TARGET_WORDS, 1), str(corrupt), r"is truncated or corrupted"),
        (model_of("gpt", TARGET_WORDS, 1), str(evil), r"holds pickled code or objects"),
        (
            model_of("llama", TARGET_WORDS, 1),
            str(exported),
            r"is a gpt model but the config's model is llama; pick a model= of the gpt family",
        ),
        (
            model_of("gpt", TARGET_WORDS, 1, n_embd=16),
            str(exported),
            r"another shape than the config's model: model.n_embd is 8 there, 16 here; set",
        ),
        (
            model_of("gpt", TARGET_WORDS, 1, block_size=16),
            str(exported),
            r"model.block_size is 8 there, 16 here \(model.block_size follows data.seq_len\)",
        ),
    ]
    for target, source, message in rows:
        with pytest.raises(UserError, match=message) as caught:
            initialise_from(target, TARGET_WORDS, source)
        assert "\n" not in str(caught.value)
    assert not marker.exists()
    # what may differ: dropout, and for rotary positions the training window
    assert (
        initialise_from(
            model_of("gpt", TARGET_WORDS, 1, dropout=0.3), TARGET_WORDS, str(exported)
        ).kept
        == 9
    )
    with pytest.raises(
        UserError, match=r"resume= continues a run with its own weights; init_from="
    ):
        resume_argv(["train.py", "resume=somewhere", f"init_from={exported}"])


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
    for name, extra in (("finetuned", [f"init_from={source}"]), ("scratch", [])):
        runs[name] = tmp_path / name
        overrides = [
            *tiny_overrides(corpus_b, cache_dir, runs[name]),
            "trainer.max_epochs=1",
            "test=false",
            "callbacks.samples=null",
            *extra,
        ]
        done = run_entry_point("train.py", *overrides)
        assert done.returncode == 0, done.stderr[-2000:]
    log = (runs["finetuned"] / "train.log").read_text()
    words_b = Vocabulary.build((corpus_b / "ptb.train.txt").read_text().splitlines()).words
    words_a = json.loads((trained_run / "checkpoints" / "vocab.json").read_text())["words"]
    kept = len(set(words_a) & set(words_b))
    assert f"init_from {source}: {kept} words keep their trained rows, 3 new words" in log
    assert read_ppl(runs["finetuned"]) < read_ppl(runs["scratch"])
    steps = [json.loads((r / "result.json").read_text())["steps"] for r in runs.values()]
    assert steps[0] == steps[1]  # a new run from step 0, not a continuation


@pytest.mark.slow
def test_init_from_a_missing_path_is_one_line_exit_2(tmp_path, corpus_dir, cache_dir):
    overrides = [*fixture_data(corpus_dir, cache_dir), f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_entry_point("train.py", "model=tiny", *overrides, "init_from=absent.ckpt")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: init_from absent.ckpt not found; pass a .ckpt file written by train.py")
    )
