"""Decoding speed of lmlab's `generate` and `beam_search`, with and without the KV cache.

    python benchmarks/generate_speed.py            # 256 new tokens, median of 3 runs
    python benchmarks/generate_speed.py --quick    # a smoke run of a few seconds
    python benchmarks/generate_speed.py --layouts  # also the step on nn.Linear's weight layout
    python benchmarks/generate_speed.py --family llama  # `llama_small` against LlamaForCausalLM
    python benchmarks/generate_speed.py --kernels  # also the step through oneDNN against torch.mm

Speeds are new tokens per second over the whole batch: batch x new tokens / seconds (for beam
search, tokens of the returned sequences, not of every beam). Where `transformers` is
importable, Hugging Face's `GPT2LMHeadModel.generate` runs the same shapes with its own cache;
GPT-2 is the same architecture (pre-LayerNorm, tanh GELU, learned positions, tied
embeddings), so the ratio measures the decoding loops, not the networks. `--family llama`
times `llama_small` against `LlamaForCausalLM` of the same config (`lmlab.hf.hf_config_values`,
what `generate.py export=` writes). Both models are randomly initialised: speed does not
depend on the weights, and no eos stops either early.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmlab.decoding import beam_search, generate
from lmlab.machine import machine_line
from lmlab.models.gpt import GPTLM, PRESETS, GPTConfig
from lmlab.models.llama import PRESETS as LLAMA_PRESETS
from lmlab.models.llama import LlamaConfig, LlamaLM
from lmlab.onednn import forced, uses_onednn

VOCAB_SIZE = 10_000
BLOCK_SIZE = 512  # room for the prompt plus 256 new tokens, so no window shift is timed
PROMPT_LEN = 8
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.95)


@dataclass(frozen=True)
class Case:
    method: str  # greedy, sample or beam4
    batch_size: int


def median_seconds(
    runs: dict[str, Callable[[int], object]], new_tokens: int, repeats: int
) -> dict[str, float]:
    """Each run's median seconds over `repeats`, the runs alternating within each repeat, so
    that a VM's drift between repeats (batch-1 speed varies by 2x between minutes on some)
    hits every run alike and their ratios hold."""
    for run in runs.values():
        run(4)  # warm-up (allocator, kernel choice, lazy imports), short: no-cache runs are slow
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(new_tokens)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def lmlab_run(
    model: GPTLM, case: Case, prompt: torch.Tensor, use_cache: bool
) -> Callable[[int], object]:
    if case.method == "beam4":
        return lambda n: beam_search(model, prompt, n, num_beams=4, use_cache=use_cache)
    kwargs = dict(temperature=0.0) if case.method == "greedy" else SAMPLING
    generator = torch.Generator().manual_seed(0)
    return lambda n: generate(model, prompt, n, generator=generator, use_cache=use_cache, **kwargs)


def hf_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """Hugging Face's model of `model`'s shapes (randomly initialised), or None without
    transformers: the config `generate.py export=` writes (`lmlab.hf.hf_config_values`; gpt
    with exact GELU, as lmlab's MLP), with no eos, so that nothing stops early, as in the
    lmlab runs."""
    try:
        import transformers
    except ImportError:
        return None
    from lmlab.hf import hf_config_values

    values = hf_config_values(model.config)
    if model.config.family == "llama":
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values))
    else:
        reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**values))
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    return reference.eval()


def hf_run(model: torch.nn.Module, case: Case, prompt: torch.Tensor) -> Callable[[int], object]:
    kwargs: dict[str, object] = dict(attention_mask=torch.ones_like(prompt), use_cache=True)
    if case.method == "greedy":
        kwargs.update(do_sample=False, num_beams=1)
    elif case.method == "sample":
        kwargs.update(do_sample=True, num_beams=1, **SAMPLING)
    else:
        kwargs.update(do_sample=False, num_beams=4, length_penalty=1.0)

    def run(new_tokens: int) -> object:
        with torch.inference_mode():
            return model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs
            )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face even if installed")
    parser.add_argument(
        "--cache-only", action="store_true", help="skip the (slow) rows without the KV cache"
    )
    parser.add_argument(
        "--layouts",
        action="store_true",
        help="also time the one-token step on nn.Linear's own weight layout against its copies",
    )
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="also time the step's products through oneDNN against torch.mm only, on any machine",
    )
    parser.add_argument(
        "--family", choices=("gpt", "llama"), default="gpt", help="gpt `small` or `llama_small`"
    )
    args = parser.parse_args()
    new_tokens, repeats = (16, 1) if args.quick else (args.new_tokens, args.repeats)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shape = {"vocab_size": VOCAB_SIZE, "block_size": BLOCK_SIZE}
    if args.family == "llama":
        config = LlamaConfig(**{**LLAMA_PRESETS["llama_small"], **shape})
        model = LlamaLM(config).eval()
    else:
        config = GPTConfig(**{**PRESETS["small"], **shape})
        model = GPTLM(config).eval()
    reference = None if args.no_hf else hf_model(model)
    cases = [Case(method, b) for method in ("greedy", "sample", "beam4") for b in (1, 8)]

    print(machine_line())
    print(
        f"model {'llama_small' if args.family == 'llama' else 'small'} ({args.family}): "
        f"{config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
        f"vocab {config.vocab_size}, block {config.block_size}; prompt {PROMPT_LEN} tokens, "
        f"{new_tokens} new tokens; median of {repeats}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if reference is None:
        print("transformers is not importable (or --no-hf): no Hugging Face column")
    else:
        import transformers

        name = type(reference).__name__
        print(f"reference: transformers {transformers.__version__} {name}.generate")
    print("speeds in new tokens/s (batch x new tokens / seconds)\n")
    header = f"{'method':<8}{'batch':>6}{'cache':>10}{'no cache':>10}{'cache x':>9}"
    if reference is not None:
        header += f"{'HF cache':>10}{'lmlab/HF':>10}"
    print(header)
    print("-" * len(header))
    for case in cases:
        prompt = torch.randint(0, VOCAB_SIZE, (case.batch_size, PROMPT_LEN))
        produced = case.batch_size * new_tokens
        runs = {
            use_cache: lmlab_run(model, case, prompt, use_cache)
            for use_cache in ((True,) if args.cache_only else (True, False))
        }
        if reference is not None:
            runs["hf"] = hf_run(reference, case, prompt)
        speeds = {
            name: produced / seconds
            for name, seconds in median_seconds(runs, new_tokens, repeats).items()
        }
        if False in speeds:
            uncached = f"{speeds[False]:>10.0f}{speeds[True] / speeds[False]:>9.1f}"
        else:  # --cache-only
            uncached = f"{'-':>10}{'-':>9}"
        line = f"{case.method:<8}{case.batch_size:>6}{speeds[True]:>10.0f}{uncached}"
        if reference is not None:
            line += f"{speeds['hf']:>10.0f}{speeds[True] / speeds['hf']:>10.2f}"
        print(line, flush=True)
    mixed_lengths(model, new_tokens, repeats)
    if args.layouts and args.family == "gpt":
        layouts(model, new_tokens, repeats)
    if args.kernels:
        kernels(model, new_tokens, repeats)


class LinearLayout(GPTLM):
    """lmlab's model with the one-token step reading views of `nn.Linear`'s (out, in)
    weights instead of `_step_weights`' transposed copies: the step as it was before them."""

    def _step_weights(self, copies: bool | None = None):
        return super()._step_weights(copies=False)


def layouts(model: GPTLM, new_tokens: int, repeats: int) -> None:
    """Speed of the step on transposed copies over the same step on `nn.Linear`'s layout."""
    original = LinearLayout(model.config).eval()
    original.load_state_dict(model.state_dict())
    print(f"\n{'method':<8}{'batch':>6}{'copies':>10}{'layout':>10}{'copies x':>10}")
    for case in [Case(method, b) for method in ("greedy", "beam4") for b in (1, 8)]:
        prompt = torch.randint(0, VOCAB_SIZE, (case.batch_size, PROMPT_LEN))
        runs = {"copies": lmlab_run(model, case, prompt, True)}
        runs["layout"] = lmlab_run(original, case, prompt, True)
        seconds = median_seconds(runs, new_tokens, repeats)
        copies, layout = (case.batch_size * new_tokens / seconds[k] for k in ("copies", "layout"))
        print(
            f"{case.method:<8}{case.batch_size:>6}{copies:>10.0f}{layout:>10.0f}"
            f"{copies / layout:>10.2f}",
            flush=True,
        )


def kernels(model: torch.nn.Module, new_tokens: int, repeats: int) -> None:
    """Speed of the step with oneDNN taking its products as `lmlab.onednn.step_mm` gives them
    (from 4 rows, and the output layer's from one) over the same step with every product
    through torch.mm (MKL on x86), on any machine: where the rule (`uses_onednn`) does not
    take oneDNN yet, this is the measurement that would extend it."""
    chosen = "oneDNN" if uses_onednn() else "torch.mm"
    print(f"\nthe step's products through oneDNN against torch.mm only (this machine: {chosen})")
    print(f"{'method':<8}{'batch':>6}{'oneDNN':>10}{'torch.mm':>10}{'oneDNN x':>10}")
    for case in [Case(method, b) for method in ("greedy", "beam4") for b in (1, 8)]:
        prompt = torch.randint(0, VOCAB_SIZE, (case.batch_size, PROMPT_LEN))
        run = lmlab_run(model, case, prompt, True)

        def through(kernel: bool, run: Callable[[int], object] = run) -> Callable[[int], object]:
            def timed(n: int) -> object:
                with forced(kernel):
                    return run(n)

            return timed

        seconds = median_seconds({"dnn": through(True), "mm": through(False)}, new_tokens, repeats)
        dnn_speed, mm_speed = (case.batch_size * new_tokens / seconds[k] for k in ("dnn", "mm"))
        print(
            f"{case.method:<8}{case.batch_size:>6}{dnn_speed:>10.0f}{mm_speed:>10.0f}"
            f"{dnn_speed / mm_speed:>10.2f}",
            flush=True,
        )


def mixed_lengths(model: GPTLM, new_tokens: int, repeats: int) -> None:
    """32 prompts of 2 to 40 tokens, greedy: one left-padded batch against one batch per length
    (what lmlab did before the model took a padding mask)."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.linspace(2, 40, 32).round().long().tolist()
    prompts = [torch.randint(0, VOCAB_SIZE, (n,), generator=generator) for n in lengths]
    longest = max(lengths)
    batch = torch.zeros(len(prompts), longest, dtype=torch.long)
    pad = torch.ones(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        batch[row, longest - len(prompt) :], pad[row, longest - len(prompt) :] = prompt, False
    groups: dict[int, list[torch.Tensor]] = {}
    for prompt in prompts:
        groups.setdefault(len(prompt), []).append(prompt)

    def grouped(n: int) -> None:
        for same in groups.values():
            generate(model, torch.stack(same), n, temperature=0.0)

    def padded(n: int) -> None:
        generate(model, batch, n, temperature=0.0, pad_mask=pad)

    produced = len(prompts) * new_tokens
    seconds = median_seconds({"grouped": grouped, "padded": padded}, new_tokens, repeats)
    by_length, together = produced / seconds["grouped"], produced / seconds["padded"]
    print(
        f"\n32 prompts of 2 to 40 tokens ({len(groups)} lengths), greedy, {new_tokens} new tokens:"
        f"\n{'one batch per length':<28}{by_length:>10.0f}"
        f"\n{'one left-padded batch':<28}{together:>10.0f}{together / by_length:>9.2f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()
