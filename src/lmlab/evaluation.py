"""Word-level perplexity of a whole split, and BLEU of the model's sentence continuations.

`main` holds eval.py's steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from lmlab.atomic import write_atomically
from lmlab.checkpoint import load_model
from lmlab.checks import is_int, is_number, is_positive_int
from lmlab.download import is_url
from lmlab.dynamic_eval import METHODS, DynamicEval, dynamic_perplexity, gradient_rms
from lmlab.errors import UserError
from lmlab.generation import (
    Decoding,
    continuation_text,
    continue_prompts,
    prompt_ids,
    resolve_device,
    until_eos,
    warn,
)
from lmlab.neural_cache import NeuralCache, cache_perplexity
from lmlab.progress import track
from lmlab.tokenizers import Tokenizer

if TYPE_CHECKING:
    from lmlab.metrics import UnitCounts

EVAL_ORDERS = ("blocks", "contiguous")


def read_text(cfg: Mapping) -> tuple[list[str], str]:
    """The lines to evaluate and their name: `text_file`, or a `split` of the data config."""
    if cfg.get("text_file") is None:
        return instantiate(cfg["data"]).read_lines(cfg["split"]), cfg["split"]
    path = Path(cfg["text_file"]).expanduser()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read text_file {cfg['text_file']}: {error}") from None
    if not any(line.strip() for line in lines):
        raise UserError(f"text_file {cfg['text_file']} holds no words")
    return lines, path.stem


def encode_lines(lines: Sequence[str], vocab: Tokenizer, source: str) -> Tensor:
    """The token ids (int64) of `lines` as training encodes them: each line's tokens, then `<eos>`."""
    unknown = vocab.unknown(lines)
    if unknown:
        shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        what = "word(s)" if vocab.kind == "word" else "character(s)"
        warn(
            f"{len(unknown)} distinct {what} of {source} are not in the checkpoint's vocabulary "
            f"and read as <unk>: {shown}"
        )
    return torch.from_numpy(vocab.encode_lines(lines)).long()


# ---------------------------------------------------------------------------
# Perplexity.


def perplexity(
    model: nn.Module,
    tokens: Tensor,
    *,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 32,
    eos_id: int = 0,
    order: str = "blocks",
    units: UnitCounts | None = None,
) -> dict[str, float | int]:
    """Perplexity over every token of `tokens` (1-D ids), each predicted exactly once.

    The stream starts with `<eos>`, as in training, so the first token is
    predicted too. Without `stride`: non-overlapping blocks of `seq_len`, the
    last one padded, which is exactly how training validates (`TokenBlocks`
    with `pad_last=True`). With `stride` s: windows of `seq_len` tokens that
    advance by s; the first scores all its tokens, each later one its newest
    s, so every token after the first window sees at least `seq_len - s`
    earlier tokens. `order="contiguous"`: `batch_size` parallel streams read in
    consecutive windows, as `data.order=contiguous` validates; a model that
    carries state (an LSTM) reads each stream whole, with all of its context.
    With `units` (the checkpoint tokenizer's), also the words and characters
    scored, word-level perplexity and bits per character (`metrics.TextScores`).
    """
    # lmlab.data brings in Lightning, seconds to import: imported here so that
    # eval.py turns a bad checkpoint or value away before paying for it.
    from lmlab.data import IGNORE_INDEX, TokenBlocks
    from lmlab.metrics import Perplexity, TextScores
    from lmlab.streams import StreamWindows, sliding_windows

    device = next(model.parameters()).device
    metric = Perplexity().to(device)
    text = TextScores().to(device)
    if order == "contiguous":
        windows = StreamWindows(tokens, batch_size, seq_len, pad_last=True, eos_id=eos_id)
        state = model.new_state(batch_size) if model.carries_state else None
        batches = (windows[i] for i in range(len(windows)))
        total = len(windows)
    else:
        if stride is None:
            blocks = TokenBlocks(tokens, seq_len, pad_last=True, eos_id=eos_id)
            pairs = zip(*blocks.all_blocks(), strict=True)
            num_windows = len(blocks)
        else:
            pairs = sliding_windows(tokens, seq_len, stride, eos_id, IGNORE_INDEX)
            num_windows = len(tokens) // stride + 1
        state = None
        groups = iter(lambda: list(islice(pairs, batch_size)), [])
        batches = ((torch.stack([x for x, _ in g]), torch.stack([y for _, y in g])) for g in groups)
        total = -(-num_windows // batch_size)
    model.eval()
    with torch.inference_mode():
        for inputs, targets in track(batches, "perplexity", total=total):  # (B, seq_len) each
            # the training's own loss path: the fused output layer, summed, no logits
            inputs, targets = inputs.to(device), targets.to(device)
            nll, scored = model(inputs, targets=targets, state=state, reduction="sum")
            metric.update(nll, scored)
            if units is not None:
                text.update(nll, *units(inputs, targets))
    count = int(metric.count)
    mean = float(metric.nll) / max(count, 1)
    results = {"tokens": count, "nll": mean, "ppl": math.exp(mean)}
    if units is not None:
        word_ppl, bpc = text.compute().tolist()
        results.update(words=int(text.words), chars=int(text.chars), word_ppl=word_ppl, bpc=bpc)
    return results


# ---------------------------------------------------------------------------
# BLEU of continuations.


def continuation_bleu(
    model: nn.Module,
    vocab: Tokenizer,
    lines: Sequence[str],
    *,
    prompt_words: int,
    num_sentences: int,
    decoding: Decoding,
    generator: torch.Generator | None = None,
    n_gram: int = 4,
    smooth: bool = False,
    batch_size: int = 32,
) -> dict | None:
    """Corpus BLEU of continuations against the true ends of the first `num_sentences` sentences.

    A sentence with more than `prompt_words` words is cut after `prompt_words`;
    the model continues that prompt (after `<eos>`, as in training) with as many
    tokens as the true remainder has words, and a continuation stops at its
    first `<eos>`. None when no sentence is long enough.
    """
    from torchmetrics.text import BLEUScore  # seconds to import: only when BLEU is asked for

    sentences = [words for words in (line.split() for line in lines) if len(words) > prompt_words]
    sentences = sentences[:num_sentences]
    if not sentences:
        return None
    prompts = [
        prompt_ids(" ".join(words[:prompt_words]), vocab, model.max_context) for words in sentences
    ]
    # as many tokens as the true remainder has (a word model: one per word)
    lengths = [len(vocab.encode(" ".join(words[prompt_words:]))) for words in sentences]
    continuations = continue_prompts(
        model, prompts, lengths, decoding, vocab=vocab, generator=generator, batch_size=batch_size
    )
    predictions = [
        continuation_text(until_eos(samples[0], vocab.eos_id), vocab, decoding.stop)
        for samples in continuations
    ]
    references = [[" ".join(words[prompt_words:])] for words in sentences]
    score = BLEUScore(n_gram=n_gram, smooth=smooth)(predictions, references)
    examples = [
        {"prompt": " ".join(words[:prompt_words]), "reference": ref[0], "continuation": pred}
        for words, ref, pred in list(zip(sentences, references, predictions, strict=True))[:3]
    ]
    return {"bleu": float(score), "sentences": len(sentences), "examples": examples}


# ---------------------------------------------------------------------------
# eval.py: its checks and its steps.


def check_eval_config(cfg: Mapping) -> Decoding:
    """Check eval.py's values before anything is loaded; return the BLEU decoding settings."""
    if cfg.get("ckpt") is None:
        raise UserError(
            "pass ckpt= a .ckpt file written by train.py, its URL or an exported folder"
        )
    splits = list(cfg.get("data", {}).get("files", {}))
    if cfg.get("text_file") is None and cfg.get("split") not in splits:
        raise UserError(f"split must be one of {', '.join(splits)}; got {cfg.get('split')!r}")
    for key in ("seq_len", "stride"):
        value = cfg.get(key)
        if value is not None and not is_positive_int(value):
            raise UserError(f"{key} must be a positive integer or null, got {value!r}")
    if cfg.get("order") not in EVAL_ORDERS:
        raise UserError(f"order must be one of {', '.join(EVAL_ORDERS)}; got {cfg.get('order')!r}")
    if cfg.get("order") == "contiguous" and cfg.get("stride") is not None:
        raise UserError(
            "stride= reads overlapping windows; order=contiguous reads each stream once: "
            "pass one of them"
        )
    if not is_positive_int(cfg.get("batch_size")):
        raise UserError(f"batch_size must be a positive integer, got {cfg.get('batch_size')!r}")
    check_dynamic_eval(cfg.get("dynamic_eval") or {})
    check_cache(cfg.get("cache") or {})
    check_output(cfg.get("output"))
    bleu = cfg.get("bleu") or {}
    num_sentences = bleu.get("num_sentences", 0)
    if not (is_int(num_sentences) and num_sentences >= 0):
        raise UserError(
            f"bleu.num_sentences must be an integer >= 0 (0 skips BLEU), got {num_sentences!r}"
        )
    for key in ("prompt_words", "n_gram"):
        if not is_positive_int(bleu.get(key)):
            raise UserError(f"bleu.{key} must be a positive integer, got {bleu.get(key)!r}")
    try:
        return Decoding.from_config(bleu).check(max_new_tokens=0)
    except UserError as error:
        raise UserError(f"bleu: {error}") from None


def is_enabled(node: Mapping, name: str) -> bool:
    """`name.enabled` of an optional part of the evaluation (false when absent)."""
    enabled = node.get("enabled", False)
    if not isinstance(enabled, bool):
        raise UserError(f"{name}.enabled must be true or false, got {enabled!r}")
    return enabled


def check_dynamic_eval(node: Mapping) -> DynamicEval | None:
    """`dynamic_eval.*` as settings, None when it is off; one line for a wrong value."""
    if not is_enabled(node, "dynamic_eval"):
        return None
    if node.get("method") not in METHODS:
        raise UserError(
            f"dynamic_eval.method must be one of {', '.join(METHODS)}; got {node.get('method')!r}"
        )
    for key in ("lr", "decay"):
        value = node.get(key)
        if not (is_number(value) and value >= 0) or (key == "decay" and value >= 1):
            limit = "a number in [0, 1)" if key == "decay" else "a number >= 0"
            raise UserError(f"dynamic_eval.{key} must be {limit}, got {value!r}")
    if not (is_number(node.get("epsilon")) and node.get("epsilon") > 0):
        raise UserError(
            f"dynamic_eval.epsilon must be a positive number, got {node.get('epsilon')!r}"
        )
    for key in ("segment", "stat_batches"):
        if not is_positive_int(node.get(key)):
            raise UserError(f"dynamic_eval.{key} must be a positive integer, got {node.get(key)!r}")
    return DynamicEval(**{field.name: node[field.name] for field in fields(DynamicEval)})


def check_cache(node: Mapping) -> NeuralCache | None:
    """`cache.*` as settings, None when it is off; one line for a wrong value."""
    if not is_enabled(node, "cache"):
        return None
    if not is_positive_int(node.get("size")):
        raise UserError(
            f"cache.size must be a positive integer (the earlier positions the cache holds), "
            f"got {node.get('size')!r}"
        )
    if not (is_number(node.get("theta")) and node.get("theta") >= 0):
        raise UserError(f"cache.theta must be a number >= 0, got {node.get('theta')!r}")
    if not (is_number(node.get("lambda")) and 0 <= node.get("lambda") <= 1):
        raise UserError(f"cache.lambda must be a number in [0, 1], got {node.get('lambda')!r}")
    return NeuralCache(size=node["size"], theta=node["theta"], lambda_=node["lambda"])


def check_tokenizer(node: Mapping | None, tokenizer: Tokenizer, ckpt: str) -> None:
    """A `tokenizer=` override must describe the checkpoint's own tokenizer, which eval.py uses."""
    if not node:
        return
    spec = instantiate(node)
    size = spec.vocab_size
    if spec.kind != tokenizer.kind or (size is not None and size != len(tokenizer)):
        wanted = spec.kind + (f" with vocab_size={size}" if size is not None else "")
        raise UserError(
            f"tokenizer={wanted} does not match checkpoint {ckpt}, whose tokenizer is "
            f"{tokenizer.kind} with {len(tokenizer)} tokens; drop the tokenizer override "
            "(eval.py always encodes with the checkpoint's own tokenizer)"
        )


def check_window(
    seq_len: int | None, stride: int | None, block_size: int, limit: int | None
) -> int:
    """The block length to use: `seq_len`, or the training window `block_size` when None.

    `limit`: the most positions the model reads at once (None: no limit).
    """
    seq_len = block_size if seq_len is None else seq_len
    if limit is not None and seq_len > limit:
        raise UserError(f"seq_len={seq_len} exceeds the model's block_size of {limit}")
    if stride is not None and stride > seq_len:
        raise UserError(
            f"stride={stride} exceeds seq_len={seq_len}: tokens between windows would never be "
            "predicted; use a stride <= seq_len"
        )
    return seq_len


def evaluate_dynamically(
    model: nn.Module,
    vocab: Tokenizer,
    tokens: Tensor,
    settings: DynamicEval,
    context: int,
    cfg: Mapping,
    cache: NeuralCache | None = None,
) -> dict:
    """Dynamic evaluation's results (settings, tokens, nll, ppl; with the `cache`, its own
    under `cache`) for eval.py's JSON."""
    grad_rms = None
    if settings.method == "rms":
        train = encode_lines(instantiate(cfg["data"]).read_lines("train"), vocab, "train")
        grad_rms = gradient_rms(
            model,
            train,
            # the windows the model reads: an LSTM's segments, a Transformer's whole context
            seq_len=settings.segment if model.carries_state else context,
            batch_size=cfg["batch_size"],
            max_batches=settings.stat_batches,
        )
    scored = dynamic_perplexity(
        model,
        tokens,
        settings,
        context=context,
        eos_id=vocab.eos_id,
        grad_rms=grad_rms,
        cache=cache,
    )
    scored.pop("scores")
    return {**asdict(settings), **scored}


def check_output(output: object) -> None:
    """`output=`: a `.json` file, new or holding earlier results, never a checkpoint or a
    folder (an `output=` naming a checkpoint replaced it with the results)."""
    if output is None:
        return
    path = Path(str(output)).expanduser()
    if path.suffix != ".json":
        raise UserError(
            f"output must name a .json file for the results, got {output!r}; "
            "e.g. output=results/eval_test.json"
        )
    if path.is_dir():
        raise UserError(f"output={output} is a folder; name a .json file inside it")
    if path.exists():
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            raise UserError(
                f"output={output} exists and does not hold JSON results; "
                "name a new file or delete that one"
            ) from None


def sweep_job_dir() -> Path | None:
    """This job's own folder when eval.py runs as one job of a sweep (`-m`), else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def default_output(ckpt: str, name: str, job_dir: Path | None = None) -> Path:
    """Beside the checkpoint (`best.ckpt` -> `best.eval_test.json`), or here for a URL; in a
    sweep, in the job's own folder (`job_dir`), so that no job overwrites another's."""
    if job_dir is not None:
        return job_dir / f"eval_{name}.json"
    if is_url(ckpt):
        return Path(f"eval_{name}.json")
    path = Path(ckpt).expanduser()
    if path.is_dir():
        return path / f"eval_{name}.json"
    return path.with_name(f"{path.stem}.eval_{name}.json")


def main(cfg: DictConfig) -> dict:
    """eval.py's steps, given its composed config (conf/eval.yaml); returns the results."""
    bleu_decoding = check_eval_config(cfg)  # before loading anything: typos fail fast
    device = resolve_device(cfg.device)
    model, vocab = load_model(cfg.ckpt, device=device)
    check_tokenizer(cfg.get("tokenizer"), vocab, str(cfg.ckpt))
    seq_len = check_window(cfg.seq_len, cfg.stride, model.config.block_size, model.max_context)
    dynamic = check_dynamic_eval(cfg.get("dynamic_eval") or {})
    cache = check_cache(cfg.get("cache") or {})
    if dynamic is not None and dynamic.segment > seq_len:
        raise UserError(
            f"dynamic_eval.segment={dynamic.segment} exceeds seq_len={seq_len}: a segment is "
            "scored inside one window; use a segment <= seq_len"
        )
    lines, name = read_text(cfg)
    from lmlab.metrics import UnitCounts  # torchmetrics: imported once the inputs are good

    tokens = encode_lines(lines, vocab, name)  # with the checkpoint's vocabulary
    results = {
        "checkpoint": str(cfg.ckpt),
        "data": name,
        "order": cfg.order,
        "seq_len": seq_len,
        "stride": cfg.stride,
    }
    results.update(
        perplexity(
            model,
            tokens,
            seq_len=seq_len,
            stride=cfg.stride,
            batch_size=cfg.batch_size,
            order=cfg.order,
            units=UnitCounts(vocab.units(), vocab.eos_id),
        )
    )
    summary = (
        f"{name} ppl {results['ppl']:.3f} over {results['tokens']} tokens | word ppl "
        f"{results['word_ppl']:.3f} over {results['words']} words | {results['bpc']:.4f} bpc"
    )
    if cache is not None:
        scored = cache_perplexity(
            model, tokens, cache, seq_len=seq_len, stride=cfg.stride, eos_id=vocab.eos_id
        )
        scored.pop("scores")
        results["cache"] = {**cache.to_dict(), **scored}
        summary += (
            f" | cache ppl {scored['ppl']:.3f} (without it, same windows: "
            f"{scored['model_ppl']:.3f})"
        )
    if dynamic is not None:
        results["dynamic_eval"] = evaluate_dynamically(
            model, vocab, tokens, dynamic, seq_len, cfg, cache
        )
        summary += f" | dynamic eval ppl {results['dynamic_eval']['ppl']:.3f}"
        if cache is not None:
            summary += f" | dynamic eval + cache ppl {results['dynamic_eval']['cache']['ppl']:.3f}"
    if cfg.bleu.num_sentences > 0:
        results["bleu"] = continuation_bleu(
            model,
            vocab,
            lines,
            prompt_words=cfg.bleu.prompt_words,
            num_sentences=cfg.bleu.num_sentences,
            decoding=bleu_decoding.check(0, vocab_size=len(vocab)),
            generator=torch.Generator(device=device).manual_seed(cfg.seed),
            n_gram=cfg.bleu.n_gram,
            smooth=cfg.bleu.smooth,
            batch_size=cfg.batch_size,
        )
        bleu = results["bleu"]
        if bleu is None:
            warn(f"no sentence has more than bleu.prompt_words={cfg.bleu.prompt_words} words")
        else:
            summary += f" | BLEU {bleu['bleu']:.4f} over {bleu['sentences']} sentences"

    output = (
        Path(cfg.output) if cfg.output else default_output(str(cfg.ckpt), name, sweep_job_dir())
    )
    write_atomically(output, json.dumps(results, indent=2) + "\n")
    print(f"{summary} | wrote {output}")
    return results
