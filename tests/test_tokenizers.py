"""Word, character and BPE tokenizers: round trips, JSON, sizes, and what each token stands for."""

import json
import math

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from lmlab import evaluation, generation
from lmlab.checkpoint import load_model
from lmlab.errors import UserError
from lmlab.tokenizers import BOUNDARY, TokenizerSpec, tokenizer_from_dict
from lmlab.vocab import Vocabulary, tokenize

from conftest import ROOT, fixture_data, run_entry_point, train_tiny

TRAIN = [
    " the company said <unk> N shares rose ",
    "",
    " = Valkyria Chronicles = ",
    " the market fell and the company said nothing ",
] * 5
TEXT = " the  company rose <unk> shares "  # every character is in TRAIN's alphabet


def trained(kind: str, vocab_size: int | None = None):
    return TokenizerSpec(kind, vocab_size).train(TRAIN)


def test_word_is_todays_vocabulary_id_for_id():
    tokenizer = trained("word")
    vocab = Vocabulary.build(TRAIN)
    assert tokenizer.words == vocab.words
    expected = vocab.encode(w for line in TRAIN for w in tokenize(line))
    assert tokenizer.encode_lines(TRAIN).tolist() == expected
    assert tokenizer.decode(tokenizer.encode("the zebra said")) == "the <unk> said"
    assert tokenizer.unknown(["the zebra said"]) == ["zebra"]


@pytest.mark.parametrize("kind, size", [("char", None), ("bpe", 60)])
def test_decode_of_encode_gives_the_words_back_with_unk_where_the_text_has_it(kind, size):
    tokenizer = trained(kind, size)
    assert tokenizer.words[:2] == ["<eos>", "<unk>"]
    assert tokenizer.decode(tokenizer.encode(TEXT)) == " ".join(TEXT.split())
    # lines decode as the word tokenizer decodes them: words and <eos> joined by single spaces
    word = trained("word")
    ids = tokenizer.encode_lines(TRAIN[:3]).tolist()
    assert tokenizer.decode(ids) == word.decode(word.encode_lines(TRAIN[:3]).tolist())
    assert tokenizer.unknown([TEXT]) == []


@pytest.mark.parametrize("kind, size", [("word", None), ("char", None), ("bpe", 60)])
def test_text_streamed_a_token_at_a_time_is_the_text_of_all_the_tokens(kind, size):
    # generate.py shows each new token as decode(tokens so far) less what it showed before
    # (generation.stream_continuation): that needs every decoded prefix to begin the next.
    tokenizer = trained(kind, size)
    generator = np.random.default_rng(0)
    for ids in generator.integers(0, len(tokenizer), size=(200, 30)).tolist():
        shown = ""
        for k in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:k])
            assert text.startswith(shown), (shown, text)
            shown = text
        assert shown == tokenizer.decode(ids)


def test_char_reads_an_unseen_character_as_unk_and_bpe_keeps_the_literal_unk_whole():
    char = trained("char")
    assert char.pieces("a b") == ["a", BOUNDARY, "b"]
    assert char.unknown(["the zoë"]) == ["z", "ë"]
    assert char.decode(char.encode("the zoo")) == "the <unk>oo"
    bpe = trained("bpe", 60)
    assert bpe.encode("<unk>") == [bpe.unk_id]


@pytest.mark.parametrize("kind, size", [("word", None), ("char", None), ("bpe", 60)])
def test_a_tokenizer_travels_as_plain_json(kind, size):
    tokenizer = trained(kind, size)
    data = json.loads(json.dumps(tokenizer.to_dict()))  # plain values only
    again = tokenizer_from_dict(data, json.loads(json.dumps(tokenizer.words)))
    assert again.kind == kind and again.words == tokenizer.words
    assert np.array_equal(again.encode_lines(TRAIN), tokenizer.encode_lines(TRAIN))


def test_bpe_trained_twice_on_the_same_lines_gives_the_same_ids_and_the_trainers_pieces():
    # tokenizers' trainer numbers the word-final characters in a hash map's order, new at
    # every training: lmlab renumbers them sorted, which changes no tokenization.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tokenizers = [trained("bpe", 60) for _ in range(4)]
    assert all(t.to_dict() == tokenizers[0].to_dict() for t in tokenizers)
    hf = HFTokenizer(models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<eos>", "<unk>"], end_of_word_suffix="</w>"
    )
    hf.train_from_iterator(TRAIN, trainer)
    for line in [TEXT, *TRAIN]:
        assert tokenizers[0].pieces(line) == hf.encode(line).tokens
    assert sorted(tokenizers[0].words) == sorted(hf.get_vocab())


def test_bpe_vocabulary_size_is_respected_and_checked_against_the_alphabet():
    assert len(trained("bpe", 60)) == 60
    with pytest.raises(UserError, match=r"tokenizer.vocab_size=10 is below the \d+ tokens BPE"):
        trained("bpe", 10)
    with pytest.raises(UserError, match="tokenizer=bpe needs tokenizer.vocab_size"):
        TokenizerSpec("bpe")
    with pytest.raises(UserError, match="applies to tokenizer=bpe only"):
        TokenizerSpec("char", 100)
    with pytest.raises(UserError, match="tokenizer.kind must be one of word, char, bpe"):
        TokenizerSpec("sentencepiece")


def test_an_unknown_tokenizer_kind_in_a_file_is_refused():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'spm'"):
        tokenizer_from_dict({"kind": "spm"}, ["<eos>", "<unk>"])


# ---------------------------------------------------------------------------
# End to end: a char and a BPE checkpoint carry their tokenizer to generate.py and eval.py.


@pytest.fixture(scope="module", params=["char", "bpe"])
def tokenizer_run(request, tmp_path_factory, corpus_dir, cache_dir):
    """(kind, run folder) of a ten-step train.py run with that tokenizer on the fixture corpus."""
    kind = request.param
    overrides = [f"tokenizer={kind}", "trainer.max_epochs=1", "trainer.limit_train_batches=10"]
    overrides += ["tokenizer.vocab_size=120"] if kind == "bpe" else []
    run = tmp_path_factory.mktemp(f"{kind}_run")
    return kind, train_tiny(run, corpus_dir, cache_dir, "test=false", *overrides)


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.slow
def test_generate_and_eval_need_nothing_but_a_char_or_bpe_checkpoint(
    tokenizer_run, corpus_dir, cache_dir, tmp_path, capsys
):
    kind, run = tokenizer_run
    ckpt = run / "checkpoints" / "best.ckpt"
    # generate.py's and eval.py's own steps, in this process (a process each costs seconds)
    generation.main(
        compose_config(
            "generate",
            f"ckpt={ckpt}",
            "prompt=the company",
            "max_new_tokens=12",
            "strategy=greedy",
            "stop_at_eos=false",
        )
    )
    text = capsys.readouterr().out.strip()
    model, tokenizer = load_model(ckpt)
    assert tokenizer.kind == kind and len(text) > 0
    # the continuation is the decoded greedy tokens: it encodes back to the same text
    assert tokenizer.decode(tokenizer.encode(text)) == " ".join(text.split())
    report = evaluation.main(
        compose_config(
            "eval",
            f"ckpt={ckpt}",
            *fixture_data(corpus_dir, cache_dir),
            "bleu.num_sentences=0",
            f"output={tmp_path / 'eval.json'}",
        )
    )
    assert report == json.loads((tmp_path / "eval.json").read_text())
    lines = (corpus_dir / "ptb.test.txt").read_text().splitlines()
    assert report["tokens"] == len(tokenizer.encode_lines(lines))
    # word-level perplexity and bits per character, directly from the text and the total NLL
    nll = report["nll"] * report["tokens"]
    words = sum(len(line.split()) + 1 for line in lines)  # <eos> counted as a word
    chars = sum(len(" ".join(line.split())) + 1 for line in lines)  # a newline per line
    assert (report["words"], report["chars"]) == (words, chars)
    assert report["word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    assert report["bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-6)


@pytest.mark.slow
def test_eval_refuses_a_tokenizer_that_is_not_the_checkpoints(trained_run, corpus_dir, cache_dir):
    ckpt = trained_run / "checkpoints" / "best.ckpt"  # tokenizer=word
    result = run_entry_point(
        "eval.py", f"ckpt={ckpt}", *fixture_data(corpus_dir, cache_dir), "tokenizer=char"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: tokenizer=char does not match checkpoint")
    assert result.stderr.strip().count("\n") == 0
