"""Text in, text out: prompts encoded with a checkpoint's tokenizer, continued in batches.

`main` holds generate.py's steps; eval.py uses the rest for BLEU of continuations. A prompt starts a
sentence: it is fed after `<eos>`, as every sentence follows one in training.
Prompts of any lengths share a batch: shorter ones are left-padded, and the
model never reads the padding, so each continues exactly as it would alone.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TextIO

import torch
import torch.nn as nn
from omegaconf import DictConfig

from lmlab.checkpoint import check_export_folder, check_export_format, export, load_model
from lmlab.checks import is_int
from lmlab.decoding import Controls, beam_search, check_beam_args, check_decoding_args, generate
from lmlab.errors import UserError
from lmlab.progress import track
from lmlab.tokenizers import Tokenizer

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
STRATEGIES = ("greedy", "sample", "beam")
OUTPUTS = ("text", "jsonl")


def warn(message: str) -> None:
    """One line on stderr, for things the user should know but that are not errors."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Decoding:
    """How to continue prompts: `greedy`, `sample` (temperature, top-k, top-p) or `beam`."""

    strategy: str = "sample"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    num_samples: int = 1
    stop_at_eos: bool = False
    context: int | None = None  # positions the model reads; None: the model's own window
    # Hugging Face generate's controls, with its names and meaning (lmlab.decoding.Controls).
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_tokens: tuple[str, ...] = ()  # words that are never generated
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()  # stop strings: the text ends right before the first one
    early_stopping: bool | str = True  # beam: True, False or "never"
    num_return_sequences: int = 1  # beam: the best n hypotheses of each prompt

    @classmethod
    def from_config(cls, node: Mapping) -> Decoding:
        """The fields of `node` that name a `Decoding` field; the rest keep their defaults."""
        values = {f.name: node[f.name] for f in fields(cls) if f.name in node}
        for name in ("suppress_tokens", "stop"):  # one value, or a list of them
            value = values.get(name)
            if value is None:
                values[name] = ()
            elif isinstance(value, str) or not isinstance(value, Iterable):
                values[name] = (value,)
            else:
                values[name] = tuple(value)
        return cls(**values)

    def controls(self, vocab: Tokenizer) -> Controls:
        """The controls on the scores, with suppressed words as ids; unknown words warn."""
        unknown = [w for w in self.suppress_tokens if w not in vocab.index]
        if unknown:
            warn(
                f"suppress_tokens: {', '.join(map(str, unknown))} not in the vocabulary; "
                "nothing to suppress there"
            )
        ids = tuple(vocab.index[w] for w in self.suppress_tokens if w in vocab.index)
        return Controls(
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            suppress_tokens=ids,
            min_new_tokens=self.min_new_tokens,
        )

    @property
    def returned(self) -> int:
        """Continuations per prompt."""
        return self.num_return_sequences if self.strategy == "beam" else self.num_samples

    def check(self, max_new_tokens: int, vocab_size: int | None = None) -> Decoding:
        """Raise `UserError` on the first bad value; return self with top_k clipped to the vocabulary.

        Every value is checked whatever the strategy, so a typo never goes unnoticed.
        """
        if self.strategy not in STRATEGIES:
            raise UserError(
                f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}"
            )
        if not isinstance(self.stop_at_eos, bool):
            raise UserError(f"stop_at_eos must be true or false, got {self.stop_at_eos!r}")
        if self.context is not None and not (is_int(self.context) and self.context >= 1):
            raise UserError(
                f"context must be a positive integer or null (the model's own), got {self.context!r}"
            )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                top_k = check_decoding_args(
                    temperature=self.temperature,
                    top_k=self.top_k,
                    top_p=self.top_p,
                    num_beams=self.num_beams,
                    max_new_tokens=max_new_tokens,
                    num_samples=self.num_samples,
                    length_penalty=self.length_penalty,
                    vocab_size=vocab_size,
                )
            except ValueError as error:  # decoding.py speaks Python; users type Hydra values
                raise UserError(str(error).replace("=None", "=null")) from None
        for warning in caught:
            warn(str(warning.message))
        try:
            Controls(
                repetition_penalty=self.repetition_penalty,
                no_repeat_ngram_size=self.no_repeat_ngram_size,
                min_new_tokens=self.min_new_tokens,
            ).check(max_new_tokens)
            check_beam_args(self.num_beams, self.early_stopping, self.num_return_sequences)
        except ValueError as error:
            raise UserError(str(error)) from None
        if any(not isinstance(text, str) or not text for text in self.stop):
            raise UserError(
                f"stop strings must be non-empty text, got {list(self.stop)!r}; "
                'e.g. stop="<eos>" or stop=[".","<eos>"]'
            )
        if self.num_return_sequences > 1 and self.strategy != "beam":
            raise UserError(
                f"num_return_sequences={self.num_return_sequences} needs strategy=beam; "
                "sampling gives several continuations with num_samples"
            )
        if self.num_samples > 1 and self.strategy != "sample":
            raise UserError(
                f"num_samples={self.num_samples} needs strategy=sample; greedy decoding and "
                "beam search give one continuation per prompt"
            )
        return replace(self, top_k=top_k)


# ---------------------------------------------------------------------------
# Prompts.


def read_prompts(prompt: object, prompts_file: str | None) -> list[str]:
    """The prompt texts: `prompt`, or the non-blank lines of `prompts_file`."""
    if prompt is not None and prompts_file is not None:
        raise UserError("pass prompt= or prompts_file=, not both")
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"cannot read prompts_file {prompts_file}: {error}") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"prompts_file {prompts_file} holds no prompt; write one per line")
        return prompts
    if prompt is None:
        raise UserError(
            'pass a prompt: prompt="the company said", or prompts_file=FILE with one per line'
        )
    text = str(prompt)  # Hydra reads prompt=1987 as a number
    if not text.strip():
        raise UserError('the prompt is empty; pass some words, e.g. prompt="the company said"')
    return [text]


def prompt_text(text: str, vocab: Tokenizer) -> str:
    """A prompt as the model reads it: lower-cased for a word model, as lmlab always did (PTB is
    lower-case); a char or BPE model reads it as written (WikiText is cased)."""
    return text.lower() if vocab.kind == "word" else text


def prompt_ids(text: str, vocab: Tokenizer, context: int | None) -> list[int]:
    """`<eos>` then the ids of `text`, cut from the left to the model's `context` (None: whole)."""
    ids = [vocab.eos_id, *vocab.encode(text)]
    return ids if context is None else ids[-context:]


def encode_prompts(texts: Sequence[str], vocab: Tokenizer, context: int | None) -> list[list[int]]:
    """Each prompt's ids, with one warning listing everything read as `<unk>`."""
    texts = [prompt_text(text, vocab) for text in texts]
    unknown = vocab.unknown(texts)
    if unknown:
        what = "word(s)" if vocab.kind == "word" else "character(s)"
        warn(
            f"{len(unknown)} prompt {what} not in the vocabulary, read as <unk>: "
            + ", ".join(unknown)
        )
    prompts = [prompt_ids(text, vocab, None) for text in texts]
    too_long = [i for i, p in enumerate(prompts) if context is not None and len(p) > context]
    if too_long:
        warn(
            f"{len(too_long)} prompt(s) longer than the model's context of {context} tokens "
            "are cut from the left"
        )
    return [ids if context is None else ids[-context:] for ids in prompts]


# ---------------------------------------------------------------------------
# Decoding in batches.


def continue_prompts(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    decoding: Decoding,
    *,
    vocab: Tokenizer,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
) -> list[list[list[int]]]:
    """New token ids, `result[prompt][i]` for each of its `decoding.returned` continuations.

    `max_new_tokens` is one number or one per prompt. Prompts are decoded in
    input order, `batch_size` at a time whatever their lengths: shorter ones
    are left-padded, and the model reads no padding, so each continuation is
    the one its prompt gets alone (the same tokens when greedy; a seeded
    `generator` gives the same text on every run). With `stop_at_eos` a
    continuation ends before its `<eos>`; a stop string ends greedy and sampled
    rows early (the text itself is cut by `continuation_text`).
    """
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    repeats = decoding.num_samples if decoding.strategy == "sample" else 1
    returned = decoding.returned
    device = next(model.parameters()).device
    controls = decoding.controls(vocab)
    stop = _stop_rows(decoding.stop, vocab) if decoding.stop else None
    results: list[list[list[int]]] = [[] for _ in prompts]
    chunks = [
        list(range(i, min(i + batch_size, len(prompts))))
        for i in range(0, len(prompts), batch_size)
    ]
    for chunk in track(chunks, "decoding"):
        longest = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), longest), vocab.eos_id, dtype=torch.long)
        pad = torch.ones(len(chunk), longest, dtype=torch.bool)
        for row, i in enumerate(chunk):
            ids[row, longest - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
            pad[row, longest - len(prompts[i]) :] = False
        ids = ids.repeat_interleave(repeats, dim=0).to(device)
        pad = pad.repeat_interleave(repeats, dim=0).to(device)
        new = max(max_new_tokens[i] for i in chunk)
        if decoding.strategy == "beam":
            out, _ = beam_search(
                model,
                ids,
                new,
                num_beams=decoding.num_beams,
                length_penalty=decoding.length_penalty,
                eos_id=vocab.eos_id,
                stop_at_eos=decoding.stop_at_eos,
                context=decoding.context,
                controls=controls,
                pad_mask=pad,
                early_stopping=decoding.early_stopping,
                num_return_sequences=returned,
            )
        else:
            out = generate(
                model,
                ids,
                new,
                temperature=0.0 if decoding.strategy == "greedy" else decoding.temperature,
                top_k=decoding.top_k,
                top_p=decoding.top_p,
                eos_id=vocab.eos_id,
                stop_at_eos=decoding.stop_at_eos,
                context=decoding.context,
                generator=generator,
                controls=controls,
                pad_mask=pad,
                stop=stop,
            )
        for row, tokens in enumerate(out[:, longest:].tolist()):
            prompt = chunk[row // returned]
            tokens = tokens[: max_new_tokens[prompt]]
            if decoding.stop_at_eos:
                tokens = until_eos(tokens, vocab.eos_id)
            results[prompt].append(tokens)
    return results


def _stop_rows(stops: Sequence[str], vocab: Tokenizer):
    """For `generate`: which rows' new text holds a stop string, (B,) bool."""

    def stopped(new_tokens: torch.Tensor) -> torch.Tensor:
        texts = [vocab.decode(row) for row in new_tokens.tolist()]
        return torch.tensor(
            [any(stop in text for stop in stops) for text in texts], device=new_tokens.device
        )

    return stopped


def until_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to, not including, the first of `stops` in it (trailing space dropped)."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=-1)
    return text if cut < 0 else text[:cut].rstrip()


def continuation_text(tokens: Sequence[int], vocab: Tokenizer, stops: Sequence[str] = ()) -> str:
    """The words of a continuation, ended before its first stop string."""
    return until_stop(vocab.decode(tokens), stops)


def check_context(context: int | None, model: nn.Module) -> int | None:
    """The window prompts are cut to: `context`, or the model's own limit (None: no cut)."""
    limit = model.max_context
    if context is not None and limit is not None and context > limit:
        raise UserError(
            f"context={context} exceeds the model's block_size of {limit}: its positional "
            "table ends there (a llama or lstm model reads further); lower context"
        )
    return context or limit


def streamable(decoding: Decoding) -> bool:
    """Whether words can be shown as they are chosen: one continuation, not a beam search, and
    no stop string (which may end the text inside words already shown)."""
    return decoding.strategy != "beam" and decoding.num_samples == 1 and not decoding.stop


def stream_continuation(
    model: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    decoding: Decoding,
    vocab: Tokenizer,
    generator: torch.Generator | None = None,
    out: TextIO | None = None,
) -> None:
    """Continue one prompt, writing each token's text to `out` (stdout) as soon as it is chosen.

    The text is exactly the line `format_continuations` would print for it:
    what is shown is the decoded continuation so far, less what was shown before.
    """
    out = out or sys.stdout
    tokens: list[int] = []
    shown = ""
    ended = False

    def show(next_ids: torch.Tensor) -> None:
        nonlocal shown, ended
        token = int(next_ids[0])
        if ended or (decoding.stop_at_eos and token == vocab.eos_id):
            ended = True
            return
        tokens.append(token)
        text = vocab.decode(tokens)
        out.write(text[len(shown) :])
        out.flush()
        shown = text

    device = next(model.parameters()).device
    generate(
        model,
        torch.tensor([list(prompt)], device=device),
        max_new_tokens,
        temperature=0.0 if decoding.strategy == "greedy" else decoding.temperature,
        top_k=decoding.top_k,
        top_p=decoding.top_p,
        eos_id=vocab.eos_id,
        stop_at_eos=decoding.stop_at_eos,
        generator=generator,
        on_token=show,
        context=decoding.context,
        controls=decoding.controls(vocab),
    )
    out.write("\n")
    out.flush()


def until_eos(tokens: list[int], eos_id: int) -> list[int]:
    """`tokens` up to, not including, the first `eos_id`."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is available; use device=cpu")
    return device


def format_continuations(
    texts: Sequence[str],
    continuations: Sequence[Sequence[Sequence[int]]],
    vocab: Tokenizer,
    output: str,
    stops: Sequence[str] = (),
) -> Iterator[str]:
    """Output lines: `text` gives each continuation on its own line, `jsonl` one object each."""
    for text, samples in zip(texts, continuations, strict=True):
        for sample, tokens in enumerate(samples):
            words = continuation_text(tokens, vocab, stops)
            if output == "jsonl":
                yield json.dumps({"prompt": text, "sample": sample, "continuation": words})
            else:
                yield words


# ---------------------------------------------------------------------------
# generate.py: its checks and its steps.


def check_generate_config(cfg: Mapping) -> Decoding:
    """Check generate.py's values before anything is loaded; return the decoding settings."""
    if cfg.get("ckpt") is None:
        raise UserError(
            "pass ckpt= a .ckpt file written by train.py, its URL or an exported folder"
        )
    max_new_tokens = cfg.get("max_new_tokens")
    decoding = Decoding.from_config(cfg).check(max_new_tokens)
    if cfg.get("output") not in OUTPUTS:
        raise UserError(f"output must be one of {', '.join(OUTPUTS)}; got {cfg.get('output')!r}")
    seed, batch_size = cfg.get("seed"), cfg.get("batch_size")
    if not (is_int(seed) and seed >= 0):
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if not (is_int(batch_size) and batch_size >= 1):
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    export = cfg.get("export")
    if export is not None and not str(export).strip():
        raise UserError("export= needs a folder path, e.g. export=exported/ptb_small")
    check_export_format(cfg.get("export_format", "safetensors"))
    if export is not None:
        check_export_folder(str(export))
    return decoding


def main(cfg: DictConfig) -> None:
    """generate.py's steps, given its composed config (conf/generate.yaml)."""
    decoding = check_generate_config(cfg)  # before loading anything: typos fail fast
    export_only = cfg.export is not None and cfg.prompt is None and cfg.prompts_file is None
    texts = [] if export_only else read_prompts(cfg.prompt, cfg.prompts_file)
    device = resolve_device(cfg.device)
    model, vocab = load_model(cfg.ckpt, device=device)
    if cfg.export is not None:
        written = export(model, vocab, cfg.export, cfg.export_format, source=str(cfg.ckpt))
        print(f"exported {cfg.ckpt} to {written}")
    if export_only:
        return

    decoding = decoding.check(cfg.max_new_tokens, vocab_size=len(vocab))  # clips top_k
    prompts = encode_prompts(texts, vocab, check_context(decoding.context, model))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    try:
        if len(prompts) == 1 and cfg.output == "text" and streamable(decoding):
            stream_continuation(model, prompts[0], cfg.max_new_tokens, decoding, vocab, generator)
            return
        continuations = continue_prompts(
            model,
            prompts,
            cfg.max_new_tokens,
            decoding,
            vocab=vocab,
            generator=generator,
            batch_size=cfg.batch_size,
        )
        for line in format_continuations(texts, continuations, vocab, cfg.output, decoding.stop):
            print(line, flush=True)
    except KeyboardInterrupt:  # Ctrl-C: keep what was printed, end its line, no traceback
        print(flush=True)
        sys.exit(EXIT_INTERRUPTED)
