"""The training losses of a seeded tiny run, step by step, against a stored reference.

Any numerical change to what a training step computes (dropout masks, the
fused loss, the data order, the optimizer, the schedule, clipping) moves
these numbers and fails this test, instead of passing unnoticed. The run is
in float64 (`trainer.precision=64-true`), so the reference holds on any CPU:
float32 matmuls round differently from one CPU's kernels to another's, float64
leaves 1e-9 of room where a real change moves the loss by 1e-3 or more.

After an intended change, regenerate the asset and say why in the commit:

    python tests/test_reference_loss.py --update
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lmlab.lit_module import LanguageModel

from conftest import ROOT, tiny_overrides, write_corpus

ASSET = Path(__file__).parent / "assets" / "reference_losses.json"
STEPS = 30
OVERRIDES = [
    "model.dropout=0.1",  # dropout and attention dropout masks are part of the reference
    "model.attn_dropout=0.1",
    "optimizer.weight_decay=0.1",
    "trainer.precision=64-true",
]


class LossRecord(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def reference_run(corpus: Path, cache: Path) -> dict:
    """What train.py builds from the composed config, trained for STEPS steps, then validated."""
    overrides = [o for o in tiny_overrides(corpus, cache, cache) if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *OVERRIDES])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    vocab = datamodule.vocab
    module = LanguageModel(
        instantiate(cfg.model, vocab_size=len(vocab)),
        vocab.words,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
    )
    record = LossRecord()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=STEPS,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=datamodule)
    (validation,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {"losses": record.losses, "val_ppl": validation["val/ppl"]}


def test_training_losses_equal_the_stored_reference(corpus_dir: Path, cache_dir: Path) -> None:
    expected = json.loads(ASSET.read_text())
    got = reference_run(corpus_dir, cache_dir)
    assert len(got["losses"]) == len(expected["losses"]) == STEPS
    for step, (value, reference) in enumerate(zip(got["losses"], expected["losses"]), start=1):
        assert abs(value - reference) <= 1e-9 * abs(reference), (
            f"step {step}: loss {value!r}, reference {reference!r}; if the change is intended, "
            "run python tests/test_reference_loss.py --update and say why in the commit"
        )
    assert abs(got["val_ppl"] / expected["val_ppl"] - 1) <= 1e-9


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus")  # the same corpus as the corpus_dir fixture
        result = reference_run(corpus, Path(tmp) / "cache")
    result["made_with"] = f"torch {torch.__version__}, python tests/test_reference_loss.py --update"
    ASSET.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {ASSET}: {len(result['losses'])} losses, val ppl {result['val_ppl']:.6f}")
