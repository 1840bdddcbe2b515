"""generate.py and lmlab.generation: prompts, batched decoding, checks, the entry point."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from lmlab.checkpoint import export, load_model
from lmlab.errors import UserError
from lmlab.generation import (
    Decoding,
    check_generate_config,
    continue_prompts,
    encode_prompts,
    format_continuations,
    read_prompts,
    stream_continuation,
)
from lmlab.models.gpt import GPTLM, GPTConfig
from lmlab.tokenizers import Tokenizer
from lmlab.vocab import Vocabulary

from conftest import ROOT, run_entry_point

VOCAB = Tokenizer(
    Vocabulary(["<eos>", "<unk>", "the", "company", "said", *(f"w{i}" for i in range(11))])
)


def tiny_model(seed: int = 0, block_size: int = 16) -> GPTLM:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=len(VOCAB), block_size=block_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0
    )
    return GPTLM(config).eval()


def generate_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("generate", overrides=["ckpt=x", "prompt=the company", *overrides])


# ---------------------------------------------------------------------------
# Checks: one clear line for every bad value, before anything is loaded.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["temperature=-1"], r"temperature must be a finite number >= 0, got -1"),
        (["top_p=0"], r"top_p must be in \(0, 1\], got 0"),
        (["top_p=1.5"], r"top_p must be in \(0, 1\], got 1.5"),
        (["top_k=0"], r"top_k must be an integer >= 1, got 0"),
        (["num_beams=0"], r"num_beams must be an integer >= 1, got 0"),
        (["max_new_tokens=-1"], r"max_new_tokens must be an integer >= 0, got -1"),
        (["num_samples=0"], r"num_samples must be an integer >= 1, got 0"),
        (["strategy=nucleus"], r"strategy must be one of greedy, sample, beam; got 'nucleus'"),
        (["num_samples=2", "strategy=beam"], r"num_samples=2 needs strategy=sample"),
        (["output=xml"], r"output must be one of text, jsonl; got 'xml'"),
        (["seed=-1"], r"seed must be a non-negative integer"),
        (["batch_size=0"], r"batch_size must be a positive integer"),
        (["ckpt=null"], r"pass ckpt= a \.ckpt file"),
        (["export="], r"export= needs a folder path"),
        (["export_format=onnx"], r"export_format must be one of safetensors, hf, got 'onnx'"),
        (["repetition_penalty=0"], r"repetition_penalty must be a number > 0, got 0"),
        (["no_repeat_ngram_size=-1"], r"no_repeat_ngram_size must be an integer >= 0, got -1"),
        (["min_new_tokens=40"], r"min_new_tokens=40 exceeds max_new_tokens=30"),
        (["stop=['']"], r"stop strings must be non-empty text"),
        (["strategy=beam", "early_stopping=sometimes"], r"early_stopping must be true, false"),
        (
            ["strategy=beam", "num_return_sequences=5"],
            r"num_return_sequences must be an integer from 1 to num_beams=4",
        ),
        (["num_return_sequences=2"], r"num_return_sequences=2 needs strategy=beam"),
    ],
)
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(UserError, match=message) as caught:
        check_generate_config(generate_config(*overrides))
    assert "\n" not in str(caught.value)


def test_defaults_pass_and_cli_spelling_is_used():
    assert check_generate_config(generate_config()).strategy == "sample"
    with pytest.raises(UserError, match=r"use top_k=null to turn"):
        check_generate_config(generate_config("top_k=-3"))


def test_top_k_above_the_vocabulary_is_clipped_with_one_warning(capsys):
    decoding = Decoding(top_k=1000).check(5, vocab_size=len(VOCAB))
    assert decoding.top_k == len(VOCAB)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: top_k=1000 exceeds")


def test_read_prompts(tmp_path):
    assert read_prompts("The Company said", None) == ["The Company said"]
    assert read_prompts(1987, None) == ["1987"]  # Hydra reads prompt=1987 as a number
    for empty in ("", "   "):
        with pytest.raises(UserError, match=r"the prompt is empty"):
            read_prompts(empty, None)
    with pytest.raises(UserError, match=r"pass a prompt"):
        read_prompts(None, None)
    with pytest.raises(UserError, match=r"not both"):
        read_prompts("a", "b.txt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the company\n\n  \nsaid w1\n")
    assert read_prompts(None, str(prompts)) == ["the company", "said w1"]
    prompts.write_text("\n \n")
    with pytest.raises(UserError, match=r"holds no prompt"):
        read_prompts(None, str(prompts))
    with pytest.raises(UserError, match=r"cannot read prompts_file"):
        read_prompts(None, str(tmp_path / "absent.txt"))


def test_encode_prompts_lowercases_warns_once_and_cuts_from_the_left(capsys):
    ids = encode_prompts(["The COMPANY said xyz", "Foo w1 xyz"], VOCAB, context=16)
    assert ids[0] == [VOCAB.eos_id, *VOCAB.vocab.encode(["the", "company", "said"]), VOCAB.unk_id]
    assert ids[1] == [VOCAB.eos_id, VOCAB.unk_id, VOCAB.index["w1"], VOCAB.unk_id]
    assert capsys.readouterr().err.splitlines() == [
        "warning: 2 prompt word(s) not in the vocabulary, read as <unk>: xyz, foo"
    ]
    long = " ".join(f"w{i % 11}" for i in range(20))
    (cut,) = encode_prompts([long], VOCAB, context=8)
    assert cut == VOCAB.vocab.encode(long.split()[-8:])
    assert "cut from the left" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Batched decoding.

PROMPTS = [[0, 2, 3], [0, 5], [0, 2, 3, 4, 6], [0, 7], [0, 9, 9]]


def test_batches_give_what_one_prompt_at_a_time_gives():
    model = tiny_model()
    greedy = Decoding(strategy="greedy")
    together = continue_prompts(model, PROMPTS, 6, greedy, vocab=VOCAB, batch_size=2)
    alone = [continue_prompts(model, [p], 6, greedy, vocab=VOCAB)[0] for p in PROMPTS]
    assert together == alone
    assert all(len(samples[0]) == 6 for samples in together)


def test_greedy_equals_beam_search_with_one_beam():
    model = tiny_model(seed=1)
    greedy = continue_prompts(model, PROMPTS, 8, Decoding(strategy="greedy"), vocab=VOCAB)
    beam = continue_prompts(model, PROMPTS, 8, Decoding(strategy="beam", num_beams=1), vocab=VOCAB)
    assert greedy == beam


def test_same_seed_same_samples():
    model = tiny_model(seed=2)
    decoding = Decoding(strategy="sample", temperature=1.5, num_samples=2)

    def run(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return continue_prompts(model, PROMPTS, 6, decoding, vocab=VOCAB, generator=generator)

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert all(len(samples) == 2 for samples in first)


def test_stop_at_eos_ends_continuations_before_eos():
    model = tiny_model(seed=3)
    decoding = Decoding(strategy="sample", temperature=5.0, stop_at_eos=True)  # ~uniform
    generator = torch.Generator().manual_seed(0)
    results = continue_prompts(model, PROMPTS * 4, 12, decoding, vocab=VOCAB, generator=generator)
    tokens = [samples[0] for samples in results]
    assert all(0 not in t and len(t) <= 12 for t in tokens)
    assert any(len(t) < 12 for t in tokens)


# ---------------------------------------------------------------------------
# The entry point.


def test_entry_point_prints_continuations_and_writes_nothing(tmp_path):
    folder = export(tiny_model(seed=4), VOCAB, tmp_path / "model")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the company\nsaid w3\nw1\n")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            f"ckpt={folder}",
            f"prompts_file={prompts}",
            "strategy=greedy",
            "max_new_tokens=5",
            "stop_at_eos=false",
            "output=jsonl",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["the company", "said w3", "w1"]
    assert all(len(r["continuation"].split()) == 5 for r in records)
    assert list(cwd.iterdir()) == []  # no outputs/, .hydra or log file


def test_entry_point_reports_bad_input_in_one_line():
    result = run_entry_point("generate.py", "ckpt=absent.ckpt", "prompt=")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'error: the prompt is empty; pass some words, e.g. prompt="the company said"'
    ]


@pytest.mark.slow
def test_generate_end_to_end(trained_run, tmp_path):
    """On a trained checkpoint: greedy = beam of one (from the export), seeds repeat, jsonl parses."""
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the company said\nw1 w4\nw2 Zzyzx\nw7 w10 w13\n")
    common = [f"prompts_file={prompts}", "max_new_tokens=6", "output=jsonl", "device=cpu"]

    exported = tmp_path / "exported"
    greedy = run_entry_point(
        "generate.py", f"ckpt={ckpt}", f"export={exported}", "strategy=greedy", *common
    )
    assert greedy.returncode == 0, greedy.stderr[-2000:]
    warnings = [line for line in greedy.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 1 prompt word(s) not in the vocabulary, read as <unk>: zzyzx"]
    lines = greedy.stdout.splitlines()
    assert lines[0] == f"exported {ckpt} to {exported}"
    records = [json.loads(line) for line in lines[1:]]
    assert [r["prompt"] for r in records] == prompts.read_text().splitlines()

    beam = run_entry_point(
        "generate.py", f"ckpt={exported}", "strategy=beam", "num_beams=1", *common
    )
    assert beam.returncode == 0, beam.stderr[-2000:]
    assert beam.stdout.splitlines() == lines[1:]

    # Sampling: the same seed gives the same text, here across a process boundary.
    sample = ["strategy=sample", "seed=11", "num_samples=2", "temperature=1.2", "top_p=0.95"]
    result = run_entry_point("generate.py", f"ckpt={ckpt}", *sample, *common)
    assert result.returncode == 0, result.stderr[-2000:]
    model, vocab = load_model(ckpt)
    texts = prompts.read_text().splitlines()
    decoding = Decoding("sample", 1.2, top_k=50, top_p=0.95, num_samples=2, stop_at_eos=True)
    again = continue_prompts(
        model,
        encode_prompts(texts, vocab, model.config.block_size),
        6,
        decoding,
        vocab=vocab,
        generator=torch.Generator().manual_seed(11),
    )
    expected = [
        {"prompt": text, "sample": i, "continuation": vocab.decode(tokens)}
        for text, samples in zip(texts, again)
        for i, tokens in enumerate(samples)
    ]
    assert [json.loads(line) for line in result.stdout.splitlines()] == expected


# ---------------------------------------------------------------------------
# One prompt: words appear as they are chosen; Ctrl-C keeps them.


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_streamed_text_is_the_line_the_batch_path_prints(strategy: str, stop_at_eos: bool):
    model = tiny_model(seed=3)
    decoding = Decoding(strategy=strategy, temperature=0.9, top_k=5, stop_at_eos=stop_at_eos)
    prompt = encode_prompts(["the company"], VOCAB, 16)
    (batched,) = continue_prompts(
        model,
        prompt,
        40,
        decoding,
        vocab=VOCAB,
        generator=torch.Generator().manual_seed(5),
    )
    (line,) = format_continuations(["the company"], [batched], VOCAB, "text")
    out = io.StringIO()
    stream_continuation(
        model, prompt[0], 40, decoding, VOCAB, torch.Generator().manual_seed(5), out
    )
    assert out.getvalue() == line + "\n"


def test_one_prompt_streams_and_ctrl_c_keeps_what_was_printed(tmp_path):
    folder = export(tiny_model(seed=4), VOCAB, tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # As a terminal starts it: Ctrl-C raises KeyboardInterrupt. A child of a background job
    # (`pytest &`, nohup) starts with SIGINT ignored, and Python then keeps it ignored.
    as_in_a_terminal = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            as_in_a_terminal,
            str(ROOT / "generate.py"),
            f"ckpt={folder}",
            "prompt=the company",
            "strategy=sample",
            "top_k=5",
            "max_new_tokens=100000000",  # far more than it can write before the signal
            "stop_at_eos=false",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = process.stdout.read(200)  # arrives while the process still decodes
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()[-2000:]
    assert err.decode().strip() == ""  # no traceback
    text = (first + rest).decode()
    assert text.endswith("\n") and text.count("\n") == 1
    assert set(text.split()) <= set(VOCAB.words) and len(text.split()) > 20


def test_context_is_checked_against_what_the_model_can_read():
    from lmlab.generation import check_context

    model = tiny_model(block_size=16)
    assert check_context(None, model) == 16 and check_context(8, model) == 8
    with pytest.raises(UserError, match=r"context=32 exceeds the model's block_size of 16"):
        check_context(32, model)
    with pytest.raises(UserError, match=r"context must be a positive integer or null"):
        Decoding(context=0).check(max_new_tokens=1)


def test_an_unknown_suppressed_word_warns_and_decoding_goes_on(capsys):
    decoding = check_generate_config(generate_config("suppress_tokens=[zzyzx,w1]"))
    controls = decoding.controls(VOCAB)
    assert controls.suppress_tokens == (VOCAB.index["w1"],)
    assert "warning: suppress_tokens: zzyzx not in the vocabulary" in capsys.readouterr().err


def test_controls_reach_decoding_from_the_config():
    decoding = check_generate_config(
        generate_config("strategy=greedy", "no_repeat_ngram_size=1", "max_new_tokens=6")
    )
    (words,) = continue_prompts(tiny_model(seed=2), [[0, 2]], 6, decoding, vocab=VOCAB)
    assert len(set(words[0])) == len(words[0]) and 2 not in words[0]  # no word twice
