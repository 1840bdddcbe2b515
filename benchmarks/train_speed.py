"""Training throughput of lmlab's `small` model through the real LightningModule and Trainer,
side by side with a plain PyTorch loop of the same model, in the same run.

    python benchmarks/train_speed.py              # every variant, median of 3 rounds
    python benchmarks/train_speed.py --quick --no-compile --no-bf16   # a smoke run

Model FLOP utilisation (MFU) is the model's FLOPs per second (6 x weights used per token,
plus attention) over a matmul peak that this script measures itself, for the same dtype, in
the same run: the median of 10 matmuls, sampled right before every timed window so that the
machine's drift (its clock, other tenants) weighs on the peak as on the steps, and MFU uses
the median of those samples. Every timed window starts after warm-up steps, and its speed
comes from its median step, so that a step slowed by another tenant of a shared machine does
not count. Rounds alternate between the variants so that drift hits all of them alike; the
table quotes the medians of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F

from lmlab import onednn
from lmlab.compilation import Measurement, decide
from lmlab.data import BatchLoader, BlockBatches, TokenBlocks
from lmlab.lit_module import LanguageModel
from lmlab.machine import machine_line
from lmlab.models.gpt import GPTLM, PRESETS, GPTConfig
from lmlab.models.interface import compile_blocks
from lmlab.precision import choose_precision

VOCAB_SIZE = 10_000
SEQ_LEN = 64
BATCH_SIZE = 32
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The run length the default row stands for: ptb_5min's budget, the shortest recipe.
DEFAULT_RUN_SECONDS = 300.0


@dataclass(frozen=True)
class Variant:
    name: str
    runner: str  # "plain" (a bare PyTorch loop) or "lightning"
    precision: str = "32-true"  # Lightning's names: 32-true, bf16-mixed
    compile: bool = False
    # Fused AdamW (conf/optimizer/adamw.yaml's default) or foreach.
    fused: bool = True
    # "logits": F.cross_entropy of the materialised logits (nanoGPT's loop, the reference);
    # "fused": the model's own loss, fused with the output layer (lmlab/loss.py). The
    # LightningModule always uses the fused one.
    loss: str = "fused"

    @property
    def matmul_dtype(self) -> str:
        """The dtype of its matmuls, the peak its MFU is measured against."""
        return "bf16" if self.precision == "bf16-mixed" else "fp32"


def model_config() -> GPTConfig:
    return GPTConfig(vocab_size=VOCAB_SIZE, block_size=SEQ_LEN, **PRESETS["small"])


def flops_per_token(config: GPTConfig) -> float:
    """Forward + backward FLOPs of one token: 6 per weight it meets, plus attention scores."""
    per_layer = 12 * config.n_embd**2  # qkv (3), proj (1), MLP (8 = 2 x 4)
    weights = config.n_layer * per_layer + config.n_embd * config.vocab_size  # + output layer
    attention = 6 * config.n_layer * SEQ_LEN * config.n_embd  # QK^T and AV, causal half x 2
    return 6 * weights + attention


def matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a square matmul in `dtype`: the ceiling the training step is measured against.

    The faster of torch's `@` and oneDNN's float32 matmul where lmlab uses it (`lmlab.onednn`:
    on an AMD CPU with AVX-512 it runs at twice MKL's rate), so that no variant's MFU is
    measured against a kernel slower than one lmlab itself runs."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    kernels = [torch.mm] + ([onednn.mm] if onednn.uses_onednn(a, b) else [])
    peaks = []
    for kernel in kernels:
        for _ in range(3):
            kernel(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel(a, b)
            times.append(time.perf_counter() - start)
        peaks.append(2 * size**3 / statistics.median(times))
    return max(peaks)


def token_stream(num_tokens: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (num_tokens,), generator=torch.Generator().manual_seed(0))


def optimizer_factory(fused: bool):
    def make(params):
        kind = dict(fused=True) if fused else dict(foreach=True)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **kind)

    return make


def tokens_per_second(step_starts: list[float]) -> float:
    """Tokens/s of the median step, from the start time of each step and the end of the last."""
    step_times = [end - start for start, end in zip(step_starts, step_starts[1:])]
    return BATCH_SIZE * SEQ_LEN / statistics.median(step_times)


def plain_loop(variant: Variant, warmup: int, steps: int) -> float:
    """Tokens/s of a bare loop: forward, loss, backward, clip, AdamW step."""
    torch.manual_seed(0)
    model = GPTLM(model_config()).train()
    if variant.compile:
        compile_blocks(model)
    optimizer = optimizer_factory(variant.fused)(model.parameters())
    blocks = TokenBlocks(token_stream((warmup + steps) * BATCH_SIZE * SEQ_LEN + 1), SEQ_LEN, False)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if variant.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    all_inputs, all_targets = blocks.all_blocks()  # gathered once, outside the timed steps
    step_starts = []
    for step in range(warmup + steps):
        if step >= warmup:
            step_starts.append(time.perf_counter())
        rows = slice(step * BATCH_SIZE, (step + 1) * BATCH_SIZE)
        inputs, targets = all_inputs[rows], all_targets[rows]
        with autocast:
            if variant.loss == "fused":
                loss = model(inputs, targets=targets)
            else:
                logits = model(inputs)
        if variant.loss == "logits":
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    step_starts.append(time.perf_counter())
    return tokens_per_second(step_starts)


class StepTimer(L.Callback):
    """Times each step after `warmup`, from inside the real Trainer: from one batch's start
    to the next one's, so that everything the Trainer does between them counts."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.step_starts: list[float] = []
        self.train_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()

    @property
    def warmup_seconds(self) -> float:
        """The warm-up steps' time: with compile=true, the compile's too."""
        return self.step_starts[0] - self.train_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.warmup:
            self.step_starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.step_starts.append(time.perf_counter())


def lightning_loop(variant: Variant, warmup: int, steps: int) -> tuple[float, float]:
    """Tokens/s of lmlab's LanguageModel in a Lightning Trainer, as train.py builds them,
    and the seconds its warm-up steps took."""
    torch.manual_seed(0)
    module = LanguageModel(
        model_config(),
        ["<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB_SIZE - 2)],
        optimizer=optimizer_factory(variant.fused),
        compile=variant.compile,
    )
    blocks = TokenBlocks(token_stream((warmup + steps) * BATCH_SIZE * SEQ_LEN + 1), SEQ_LEN, False)
    loader = BatchLoader(blocks, BlockBatches(len(blocks), BATCH_SIZE, shuffle=True))
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=variant.precision,
        max_steps=warmup + steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return tokens_per_second(timer.step_starts), timer.warmup_seconds


VARIANTS = [
    Variant("plain fp32 (reference)", "plain", loss="logits", fused=False),
    Variant("plain fp32 fused loss+AdamW", "plain"),
    Variant("lightning fp32", "lightning"),
    Variant("lightning fp32 foreach AdamW", "lightning", fused=False),
    Variant("plain bf16-mixed", "plain", precision="bf16-mixed"),
    Variant("lightning bf16-mixed", "lightning", precision="bf16-mixed"),
    Variant("lightning fp32 compile", "lightning", compile=True),
    Variant("lightning bf16-mixed compile", "lightning", precision="bf16-mixed", compile=True),
]


def default_variant(
    variants: list[Variant],
    precision: str,
    speeds: dict[str, list[float]],
    warmups: dict[str, list[float]],
) -> tuple[str, str]:
    """The Lightning row train.py's defaults run here, and compile=auto's reason.

    compile=auto's own rule (`lmlab.compilation.compile_pays`), for a run of
    `DEFAULT_RUN_SECONDS`, on this run's step times and compile time (the compiled
    variant's first warm-up beyond the eager one's).
    """

    def row(compile: bool) -> Variant | None:
        return next(
            (
                v
                for v in variants
                if v.runner == "lightning"
                and v.precision == precision
                and v.fused
                and v.compile == compile
            ),
            None,
        )

    eager, compiled = row(False), row(True)
    if eager is None:
        return "", f"not measured (no {precision} rows in this run)"
    if compiled is None:
        return eager.name, "not measured (--no-compile)"
    step = {
        v.name: BATCH_SIZE * SEQ_LEN / statistics.median(speeds[v.name]) for v in (eager, compiled)
    }
    # The first round's warm-up: later rounds reuse inductor's cache of the first's compile,
    # and a fresh train.py run pays the cold compile.
    warm = {v.name: warmups[v.name][0] for v in (eager, compiled)}
    measured = Measurement(
        eager_step=step[eager.name],
        compiled_step=step[compiled.name],
        compile_seconds=max(0.0, warm[compiled.name] - warm[eager.name]),
    )
    choice = decide(DEFAULT_RUN_SECONDS, measured)
    return (compiled if choice.compile else eager).name, choice.reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one round")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--no-bf16", action="store_true", help="skip the bf16 rows (slow where the CPU lacks bf16)"
    )
    args = parser.parse_args()
    warmup, steps, rounds = (1, 2, 1) if args.quick else (8, args.steps, args.rounds)
    variants = [
        v
        for v in VARIANTS
        if not (args.no_compile and v.compile) and not (args.no_bf16 and v.matmul_dtype == "bf16")
    ]
    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)

    config = model_config()
    # What train.py's default precision (trainer.precision=auto) runs on this machine:
    # measured afresh, not read from a user's cache.
    with tempfile.TemporaryDirectory() as cache_dir:
        default = choose_precision("auto", "cpu", config.n_embd, cache_dir)
    speeds: dict[str, list[float]] = {v.name: [] for v in variants}
    warmups: dict[str, list[float]] = {v.name: [] for v in variants}
    peaks: dict[str, list[float]] = {name: [] for name in MATMUL_DTYPES}
    for _ in range(rounds):
        for variant in variants:
            # The peak is sampled right before each timed window, so that the machine's
            # drift (clock, other tenants) weighs on the peak as on the steps.
            dtype = variant.matmul_dtype
            peaks[dtype].append(matmul_peak(MATMUL_DTYPES[dtype]))
            if variant.runner == "plain":
                speeds[variant.name].append(plain_loop(variant, warmup, steps))
            else:
                speed, warm = lightning_loop(variant, warmup, steps)
                speeds[variant.name].append(speed)
                warmups[variant.name].append(warm)

    peak = {k: statistics.median(v) for k, v in peaks.items() if v}
    default_name, compiled = default_variant(variants, default.precision, speeds, warmups)
    reference = statistics.median(speeds[VARIANTS[0].name])
    # Lightning's overhead: against the plain loop doing the same work (dtype, loss, AdamW).
    plain_by_setup = {
        (v.precision, v.loss, v.fused): statistics.median(speeds[v.name])
        for v in variants
        if v.runner == "plain" and not v.compile
    }
    print(machine_line())
    print(
        f"model 'small' ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
        f"vocab {VOCAB_SIZE}); batch {BATCH_SIZE} x {SEQ_LEN}; median of {steps} timed steps "
        f"after {warmup} warm-up, median of {rounds} rounds; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for dtype, samples in peaks.items():
        if samples:
            print(
                f"{dtype} matmul peak (1024^3): {peak[dtype] / 1e9:.0f} GFLOP/s, median of "
                f"{len(samples)} samples, one before each timed window "
                f"({min(samples) / 1e9:.0f} to {max(samples) / 1e9:.0f})"
            )
    print(f"model FLOPs per token {flops_per_token(config) / 1e6:.1f} M")
    header = (
        f"{'variant':34} {'tokens/s':>9} {'MFU':>6} {'x reference':>12} {'x plain same setup':>19}"
    )
    print(header)
    print("-" * len(header))
    for variant in variants:
        speed = statistics.median(speeds[variant.name])
        dtype = variant.matmul_dtype
        mfu = speed * flops_per_token(config) / peak[dtype]
        same_setup = plain_by_setup.get((variant.precision, variant.loss, variant.fused))
        ratio_same = f"{speed / same_setup:.3f}" if same_setup else "-"
        name = variant.name + (" (default)" if variant.name == default_name else "")
        print(f"{name:34} {speed:9.0f} {mfu:6.1%} {speed / reference:12.3f} {ratio_same:>19}")
    print(f"default: trainer.precision=auto chose {default.precision} ({default.reason})")
    print(f"default: compile=auto, for a {DEFAULT_RUN_SECONDS:.0f} s run: {compiled}")
    fastest = max(variants, key=lambda v: statistics.median(speeds[v.name]))
    if default_name in speeds:
        ratio = statistics.median(speeds[default_name]) / statistics.median(speeds[fastest.name])
        print(f"default / fastest ({fastest.name}): {ratio:.3f}")


if __name__ == "__main__":
    main()
