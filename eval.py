"""Evaluate a trained model: python eval.py ckpt=PATH [split=test]. See docs/decoding.md."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from lmlab.checkpoint import load_model
from lmlab.errors import report_user_errors
from lmlab.evaluation import (
    check_eval_config,
    check_window,
    continuation_bleu,
    default_output,
    encode_lines,
    perplexity,
    read_text,
)
from lmlab.generation import resolve_device, warn


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@report_user_errors
def main(cfg: DictConfig) -> dict:
    bleu_decoding = check_eval_config(cfg)  # before loading anything: typos fail fast
    device = resolve_device(cfg.device)
    model, vocab = load_model(cfg.ckpt, device=device)
    seq_len = check_window(cfg.seq_len, cfg.stride, model.config.block_size)
    lines, name = read_text(cfg)

    tokens = encode_lines(lines, vocab, name)  # with the checkpoint's vocabulary
    results = {"checkpoint": str(cfg.ckpt), "data": name, "seq_len": seq_len, "stride": cfg.stride}
    results.update(
        perplexity(model, tokens, seq_len=seq_len, stride=cfg.stride, batch_size=cfg.batch_size)
    )
    summary = f"{name} ppl {results['ppl']:.3f} over {results['tokens']} tokens"
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

    output = Path(cfg.output) if cfg.output else default_output(str(cfg.ckpt), name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{summary} | wrote {output}")
    return results


if __name__ == "__main__":
    main()
