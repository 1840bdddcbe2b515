"""eval.py and lmlab.evaluation: perplexity as training measures it, sliding windows, BLEU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torchmetrics.text import Perplexity

from lmlab.data import IGNORE_INDEX, TokenBlocks
from lmlab.errors import UserError
from lmlab.evaluation import (
    check_eval_config,
    check_window,
    continuation_bleu,
    perplexity,
    read_text,
)
from lmlab.generation import Decoding
from lmlab.models.gpt import GPTLM, GPTConfig
from lmlab.models.kv_cache import KVCache
from lmlab.tokenizers import Tokenizer
from lmlab.vocab import Vocabulary

from conftest import ROOT, evaluate_tiny, fixture_data, run_entry_point, tiny_overrides

VOCAB = Tokenizer(Vocabulary(["<eos>", "<unk>", *(f"w{i}" for i in range(14))]))


def tiny_model(seed: int = 0, block_size: int = 8) -> GPTLM:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=len(VOCAB), block_size=block_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0
    )
    return GPTLM(config).eval()


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, len(VOCAB), (n,), generator=torch.Generator().manual_seed(seed))


def eval_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=["ckpt=x", *overrides])


# ---------------------------------------------------------------------------
# Perplexity.


def test_blocks_measure_what_training_validation_measures():
    model, tokens = tiny_model(), random_tokens(101)
    metric = Perplexity(ignore_index=IGNORE_INDEX)
    blocks = TokenBlocks(tokens, 8, pad_last=True)
    with torch.no_grad():
        for start in range(0, len(blocks), 3):  # as LanguageModel.validation_step does
            inputs, targets = blocks[list(range(start, min(start + 3, len(blocks))))]
            metric.update(model(inputs), targets)
    result = perplexity(model, tokens, seq_len=8, batch_size=5)
    assert result["tokens"] == 101
    assert result["ppl"] == pytest.approx(float(metric.compute()), rel=1e-5)


def reference_sliding(model: GPTLM, tokens: torch.Tensor, seq_len: int, stride: int):
    """Token by token: each target's context is its window's start up to itself."""
    stream = torch.cat([torch.tensor([0]), tokens])
    total, scored, begin = 0.0, 0, 0
    while scored < len(tokens):
        end = min(begin + seq_len, len(tokens))
        for t in range(scored, end):
            logits = model(stream[None, begin : t + 1])[0, -1]
            total -= float(F.log_softmax(logits, -1)[stream[t + 1]])
        scored, begin = end, begin + stride
    return math.exp(total / len(tokens))


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_sliding_windows_predict_each_token_once(stride):
    model, tokens = tiny_model(seed=1), random_tokens(37, seed=1)
    with torch.no_grad():
        expected = reference_sliding(model, tokens, 8, stride)
    result = perplexity(model, tokens, seq_len=8, stride=stride, batch_size=4)
    assert result["tokens"] == 37
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    if stride == 8:  # windows that do not overlap are the blocks
        assert result["ppl"] == pytest.approx(perplexity(model, tokens, seq_len=8)["ppl"])


# ---------------------------------------------------------------------------
# BLEU of continuations.


class NextWord(nn.Module):
    """A perfect model of the sentences `wi w(i+1) w(i+2) ...`: always predicts the next id."""

    def __init__(self) -> None:
        super().__init__()
        self.config = GPTConfig(vocab_size=len(VOCAB), block_size=16, n_layer=1, n_head=1, n_embd=4)
        self.zero = nn.Parameter(torch.zeros(()))

    max_context = 16

    def new_state(self, batch_size, max_len=None, device=None, dtype=None) -> KVCache:
        return KVCache(1, batch_size, 1, 1, max_len or 16, device=device)

    def forward(self, idx: torch.Tensor, state=None, pad_mask=None) -> torch.Tensor:
        if state is not None:
            state.advance(idx.size(1))
        return 10.0 * F.one_hot((idx + 1) % len(VOCAB), len(VOCAB)).float() + self.zero


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_bleu_scores_continuations_against_the_rest_of_each_sentence(strategy):
    lines = [" w1 w2 w3 w4 w5 w6 w7 ", " w2 w3 ", " w5 w6 w7 w8 w9 w10", " w3 w4 w5 w6 w7 w8 w9"]
    result = continuation_bleu(
        NextWord(),
        VOCAB,
        lines,
        prompt_words=2,
        num_sentences=2,
        decoding=Decoding(strategy=strategy, num_beams=2),
    )
    assert result["bleu"] == pytest.approx(1.0)
    assert result["sentences"] == 2  # " w2 w3 " is too short; the fourth is past the limit
    assert result["examples"][1] == {
        "prompt": "w5 w6",
        "reference": "w7 w8 w9 w10",
        "continuation": "w7 w8 w9 w10",
    }
    assert (
        continuation_bleu(
            NextWord(), VOCAB, [" w1 w2 "], prompt_words=2, num_sentences=5, decoding=Decoding()
        )
        is None
    )


# ---------------------------------------------------------------------------
# Checks.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["split=dev"], r"split must be one of train, valid, test; got 'dev'"),
        (["stride=0"], r"stride must be a positive integer or null, got 0"),
        (["seq_len=-4"], r"seq_len must be a positive integer or null"),
        (["batch_size=0"], r"batch_size must be a positive integer"),
        (["bleu.num_sentences=-1"], r"bleu.num_sentences must be an integer >= 0"),
        (["bleu.prompt_words=0"], r"bleu.prompt_words must be a positive integer"),
        (["bleu.top_p=2"], r"bleu: top_p must be in \(0, 1\], got 2"),
        (["bleu.temperature=-0.5"], r"bleu: temperature must be a finite number >= 0"),
        (["bleu.strategy=best"], r"bleu: strategy must be one of greedy, sample, beam"),
        (["bleu.num_beams=0"], r"bleu: num_beams must be an integer >= 1"),
        (["ckpt=null"], r"pass ckpt= a \.ckpt file"),
        (["dynamic_eval.enabled=yes"], r"dynamic_eval.enabled must be true or false, got 'yes'"),
        (
            ["dynamic_eval.enabled=true", "dynamic_eval.method=adam"],
            r"dynamic_eval.method must be one of sgd, rms; got 'adam'",
        ),
        (
            ["dynamic_eval.enabled=true", "dynamic_eval.lr=-1"],
            r"dynamic_eval.lr must be a number >= 0, got -1",
        ),
        (
            ["dynamic_eval.enabled=true", "dynamic_eval.decay=1.5"],
            r"dynamic_eval.decay must be a number in \[0, 1\), got 1.5",
        ),
        (
            ["dynamic_eval.enabled=true", "dynamic_eval.segment=0"],
            r"dynamic_eval.segment must be a positive integer, got 0",
        ),
        (
            ["dynamic_eval.enabled=true", "dynamic_eval.epsilon=0"],
            r"dynamic_eval.epsilon must be a positive number, got 0",
        ),
        (["cache.enabled=1"], r"cache.enabled must be true or false, got 1"),
        (
            ["cache.enabled=true", "cache.size=0"],
            r"cache.size must be a positive integer \(the earlier positions the cache holds\), got 0",
        ),
        (["cache.enabled=true", "cache.lambda=1.5"], r"cache.lambda must be a number in \[0, 1\]"),
        (["cache.enabled=true", "cache.lambda=-0.1"], r"cache.lambda must be a number in \[0, 1\]"),
        (["cache.enabled=true", "cache.theta=-1"], r"cache.theta must be a number >= 0, got -1"),
    ],
)
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        check_eval_config(eval_config(*overrides))


def test_output_names_a_json_file_and_never_replaces_anything_else(tmp_path):
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04 weights")
    text = tmp_path / "notes.json"
    text.write_text("not json")
    earlier = tmp_path / "eval_test.json"
    earlier.write_text('{"ppl": 1.0}')
    for output, message in (
        (checkpoint, r"output must name a \.json file for the results, got '.*best\.ckpt'"),
        (tmp_path, r"output must name a \.json file"),
        (tmp_path / "folder.json", r"output=.*folder\.json is a folder"),
        (text, r"output=.*notes\.json exists and does not hold JSON results"),
    ):
        (tmp_path / "folder.json").mkdir(exist_ok=True)
        with pytest.raises(UserError, match=message):
            check_eval_config(eval_config(f"output={output}"))
    assert checkpoint.read_bytes() == b"PK\x03\x04 weights"
    check_eval_config(eval_config(f"output={earlier}"))  # earlier results: replaced
    check_eval_config(eval_config(f"output={tmp_path / 'new' / 'eval.json'}"))


def test_windows_must_fit_the_model():
    assert check_window(None, None, block_size=16, limit=16) == 16
    with pytest.raises(UserError, match=r"seq_len=32 exceeds the model's block_size of 16"):
        check_window(32, None, block_size=16, limit=16)
    with pytest.raises(UserError, match=r"stride=9 exceeds seq_len=8"):
        check_window(8, 9, block_size=16, limit=16)


def test_text_comes_from_a_split_or_any_file(corpus_dir, cache_dir, tmp_path):
    data = [o for o in tiny_overrides(corpus_dir, cache_dir, tmp_path) if o.startswith("data")]
    split_lines, name = read_text(eval_config("split=valid", *data))
    assert name == "valid" and len(split_lines) == 60
    text = corpus_dir / "ptb.valid.txt"
    assert read_text(eval_config(f"text_file={text}")) == (split_lines, "ptb.valid")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"text_file .*blank.txt holds no words"):
        read_text(eval_config(f"text_file={tmp_path / 'blank.txt'}"))
    with pytest.raises(UserError, match=r"cannot read text_file"):
        read_text(eval_config(f"text_file={tmp_path / 'absent.txt'}"))


# ---------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_eval_reproduces_the_validation_perplexity_training_logged(
    trained_run, corpus_dir, cache_dir, tmp_path
):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    callbacks = torch.load(ckpt, weights_only=True)["callbacks"]
    (logged,) = [
        float(state["best_model_score"])
        for key, state in callbacks.items()
        if key.startswith("ModelCheckpoint")
    ]
    data = [o for o in tiny_overrides(corpus_dir, cache_dir, tmp_path) if o.startswith("data")]
    result = run_entry_point(
        "eval.py", f"ckpt={ckpt}", "split=valid", *data, "bleu.num_sentences=10", "device=cpu"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("valid ppl ")
    report = json.loads(ckpt.with_name("best.eval_valid.json").read_text())  # the default place
    assert report["ppl"] == pytest.approx(logged, rel=1e-3)
    assert report["tokens"] == sum(
        len(line.split()) + 1 for line in (corpus_dir / "ptb.valid.txt").read_text().splitlines()
    )
    assert report["seq_len"] == 16 and report["stride"] is None
    assert report["bleu"]["sentences"] == 10 and 0 <= report["bleu"]["bleu"] <= 1


def refusal(ckpt: Path, corpus_dir: Path, cache_dir: Path, *overrides: str) -> str:
    """eval.py's one line for a bad value; it must exit 2 with nothing else on stderr."""
    result = run_entry_point(
        "eval.py", f"ckpt={ckpt}", *fixture_data(corpus_dir, cache_dir), "bleu.num_sentences=0",
        *overrides,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_dynamic_eval_reports_its_perplexity_beside_the_static_one(
    trained_run, corpus_dir, cache_dir, tmp_path
):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    learning = ["dynamic_eval.enabled=true", "dynamic_eval.segment=4", "split=valid"]
    report = evaluate_tiny(
        ckpt,
        corpus_dir,
        cache_dir,
        tmp_path / "rms.json",
        *learning,
        "dynamic_eval.lr=1e-4",
        "dynamic_eval.stat_batches=5",
    )
    dynamic = report["dynamic_eval"]
    assert dynamic["method"] == "rms" and dynamic["segment"] == 4 and dynamic["lr"] == 1e-4
    assert dynamic["tokens"] == report["tokens"]  # every token scored once, both ways
    assert dynamic["ppl"] != report["ppl"]  # it learned from the text
    still = evaluate_tiny(
        ckpt, corpus_dir, cache_dir, tmp_path / "sgd.json", *learning,
        "dynamic_eval.method=sgd", "dynamic_eval.lr=0", "dynamic_eval.decay=0", "stride=4",
    )  # fmt: skip
    # no learning: the static perplexity of the same windows (seq_len 16, advancing by 4)
    assert still["dynamic_eval"]["ppl"] == pytest.approx(still["ppl"], rel=1e-5)
    assert refusal(
        ckpt, corpus_dir, cache_dir, "dynamic_eval.enabled=true", "dynamic_eval.segment=17"
    ) == (
        "error: dynamic_eval.segment=17 exceeds seq_len=16: a segment is scored inside one "
        "window; use a segment <= seq_len"
    )


@pytest.mark.slow
def test_the_cache_reports_its_perplexity_alone_and_with_dynamic_eval(
    trained_run, corpus_dir, cache_dir, tmp_path
):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    report = evaluate_tiny(
        ckpt, corpus_dir, cache_dir, tmp_path / "cache.json", "split=valid",
        "cache.enabled=true", "cache.size=100", "cache.theta=0.5", "cache.lambda=0.2",
        "dynamic_eval.enabled=true", "dynamic_eval.method=sgd", "dynamic_eval.lr=0.01",
        "dynamic_eval.segment=4",
    )  # fmt: skip
    cache = report["cache"]
    assert (cache["size"], cache["theta"], cache["lambda"]) == (100, 0.5, 0.2)
    assert cache["tokens"] == report["tokens"]  # every token scored once, both ways
    # the model alone over the same blocks, one at a time: the static perplexity
    assert cache["model_ppl"] == pytest.approx(report["ppl"], rel=1e-5)
    assert cache["ppl"] != cache["model_ppl"]
    both = report["dynamic_eval"]["cache"]
    assert both["lambda"] == 0.2 and both["ppl"] not in (
        cache["ppl"],
        report["dynamic_eval"]["ppl"],
    )
    assert refusal(ckpt, corpus_dir, cache_dir, "cache.enabled=true", "cache.size=0") == (
        "error: cache.size must be a positive integer (the earlier positions the cache holds), "
        "got 0"
    )


@pytest.mark.slow
def test_a_sweep_writes_each_jobs_results_in_its_own_folder(
    trained_run, corpus_dir, cache_dir, tmp_path
):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    beside = ckpt.with_name("best.eval_valid.json")  # another test may have written it
    before = beside.read_bytes() if beside.exists() else None
    result = run_entry_point(
        "eval.py", "-m", f"ckpt={ckpt}", *fixture_data(corpus_dir, cache_dir), "split=valid",
        "bleu.num_sentences=0", "dynamic_eval.enabled=true", "dynamic_eval.method=sgd",
        "dynamic_eval.lr=0,0.01", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [
        json.loads((tmp_path / "sweep" / job / "eval_valid.json").read_text()) for job in "01"
    ]
    assert [r["dynamic_eval"]["lr"] for r in reports] == [0, 0.01]
    assert reports[0]["dynamic_eval"]["ppl"] != reports[1]["dynamic_eval"]["ppl"]
    assert (beside.read_bytes() if beside.exists() else None) == before  # left alone
