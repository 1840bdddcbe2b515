"""Training throughput of lmlab's LSTM (Zaremba et al.'s small shape) against the loop a user
would write by hand, in the same run.

    python benchmarks/lstm_speed.py                # 2 x 200, batch 20 x 20, median of 3 rounds
    python benchmarks/lstm_speed.py --quick        # a smoke run

The reference is pytorch/examples' word_language_model set-up: `nn.Embedding`, a
2-layer `nn.LSTM`, an `nn.Linear` output layer and `F.cross_entropy` of its
logits, SGD and gradient clipping, the hidden state carried (detached) from one
window to the next. lmlab's row is the real LightningModule and Trainer with
`model=lstm_small`'s shape (untied, no dropout, as Zaremba's small model),
`data.order=contiguous` and its fused output-layer loss, in fp32 (its matmuls through
the kernel `lmlab.onednn` picks for this CPU; where that is oneDNN, also through
torch.mm, for comparison) and, where
`trainer.precision=auto` chooses otherwise on this machine, in that precision too
(the row marked default is what train.py runs). Rounds alternate
between the two so that the machine's drift hits both alike; each speed is the
median step of a timed window, the table quotes the median of the rounds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from functools import partial

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from train_speed import StepTimer

from lmlab import onednn
from lmlab.data import BatchLoader, keep_batch
from lmlab.lit_module import LanguageModel
from lmlab.machine import machine_line
from lmlab.models.lstm import LSTMConfig
from lmlab.precision import choose_precision
from lmlab.streams import StreamWindows, WindowOrder

VOCAB_SIZE = 10_000
BATCH, WINDOW, WIDTH, LAYERS = 20, 20, 200, 2


def stream(windows: int) -> torch.Tensor:
    tokens = BATCH * WINDOW * windows + 1
    return torch.randint(0, VOCAB_SIZE, (tokens,), generator=torch.Generator().manual_seed(0))


class PlainLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, WIDTH)
        self.lstm = nn.LSTM(WIDTH, WIDTH, num_layers=LAYERS, batch_first=True)
        self.decoder = nn.Linear(WIDTH, VOCAB_SIZE)

    def forward(self, idx, hidden):
        out, hidden = self.lstm(self.embedding(idx), hidden)
        return self.decoder(out), hidden


def tokens_per_second(starts: list[float]) -> float:
    steps = [b - a for a, b in zip(starts, starts[1:])]
    return BATCH * WINDOW / statistics.median(steps)


def plain_loop(warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    model = PlainLSTM().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    windows = StreamWindows(stream(warmup + steps), BATCH, WINDOW, pad_last=False)
    hidden = None
    starts = []
    for step in range(warmup + steps):
        if step >= warmup:
            starts.append(time.perf_counter())
        inputs, targets = windows[step]
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden)
        logits, hidden = model(inputs, hidden)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
    starts.append(time.perf_counter())
    return tokens_per_second(starts)


def lightning_loop(
    warmup: int, steps: int, precision: str = "32-true", onednn_matmuls: bool | None = None
) -> float:
    """lmlab's steps/s; `onednn_matmuls` forces the fp32 loss's matmul kernel (`lmlab.onednn`)."""
    if onednn_matmuls is not None:
        with onednn.forced(onednn_matmuls):
            return lightning_loop(warmup, steps, precision)
    torch.manual_seed(0)
    config = LSTMConfig(
        vocab_size=VOCAB_SIZE,
        block_size=WINDOW,
        n_layer=LAYERS,
        n_embd=WIDTH,
        n_hidden=WIDTH,
        tie_weights=False,
        lstm_init_range=0.1,
    )
    module = LanguageModel(
        config,
        ["<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB_SIZE - 2)],
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        carry_state=True,
    )
    windows = StreamWindows(stream(warmup + steps), BATCH, WINDOW, pad_last=False)
    loader = BatchLoader(windows, WindowOrder(len(windows)), collate_fn=keep_batch)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        gradient_clip_val=5.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return tokens_per_second(timer.step_starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one round")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warmup, steps, rounds = (3, 5, 1) if args.quick else (10, args.steps, args.rounds)
    warnings.filterwarnings("ignore")
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    # What train.py's default trainer.precision=auto runs on this machine, measured afresh.
    with tempfile.TemporaryDirectory() as cache_dir:
        default = choose_precision("auto", "cpu", WIDTH, cache_dir, needs_native_bf16=True)
    rows = {"plain nn.LSTM loop (reference)": plain_loop, "lmlab lstm, Lightning": lightning_loop}
    kernel = "oneDNN" if onednn.uses_onednn() else "torch.mm"  # this machine's fp32 matmuls
    if kernel == "oneDNN":  # and the other kernel, for comparison
        rows["lmlab lstm, Lightning, fp32 matmuls by torch.mm"] = partial(
            lightning_loop, onednn_matmuls=False
        )
    if default.precision != "32-true":
        rows[f"lmlab lstm, Lightning, {default.precision}"] = partial(
            lightning_loop, precision=default.precision
        )
    default_row = list(rows)[-1] if default.precision != "32-true" else "lmlab lstm, Lightning"
    speeds: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, run in rows.items():
            speeds[name].append(run(warmup, steps))
    print(machine_line())
    print(
        f"LSTM {LAYERS} x {WIDTH}, vocab {VOCAB_SIZE}, batch {BATCH} x {WINDOW} tokens, SGD, "
        f"clip 5; median of {steps} timed steps after {warmup}, median of {rounds} rounds"
    )
    reference = statistics.median(speeds["plain nn.LSTM loop (reference)"])
    print(f"{'variant':45} {'tokens/s':>9} {'x reference':>12}")
    print("-" * 68)
    for name in rows:
        speed = statistics.median(speeds[name])
        label = name + (" (default)" if name == default_row else "")
        print(f"{label:45} {speed:9.0f} {speed / reference:12.3f}")
    print(f"default: trainer.precision=auto chose {default.precision} ({default.reason})")
    print(f"lmlab's fp32 matmuls on this machine: {kernel} (lmlab.onednn)")


if __name__ == "__main__":
    main()
