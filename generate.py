"""Continue prompts with a trained model: python generate.py ckpt=PATH prompt="...". See docs/decoding.md."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from lmlab.checkpoint import export, load_model
from lmlab.errors import report_user_errors
from lmlab.generation import (
    check_generate_config,
    continue_prompts,
    encode_prompts,
    format_continuations,
    read_prompts,
    resolve_device,
)


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    decoding = check_generate_config(cfg)  # before loading anything: typos fail fast
    export_only = cfg.export is not None and cfg.prompt is None and cfg.prompts_file is None
    texts = [] if export_only else read_prompts(cfg.prompt, cfg.prompts_file)
    device = resolve_device(cfg.device)
    model, vocab = load_model(cfg.ckpt, device=device)
    if cfg.export is not None:
        print(f"exported {cfg.ckpt} to {export(model, vocab, cfg.export)}")
    if export_only:
        return

    decoding = decoding.check(cfg.max_new_tokens, vocab_size=len(vocab))  # clips top_k
    prompts = encode_prompts(texts, vocab, model.config.block_size)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    continuations = continue_prompts(
        model,
        prompts,
        cfg.max_new_tokens,
        decoding,
        eos_id=vocab.eos_id,
        generator=generator,
        batch_size=cfg.batch_size,
    )
    for line in format_continuations(texts, continuations, vocab, cfg.output):
        print(line)


if __name__ == "__main__":
    main()
