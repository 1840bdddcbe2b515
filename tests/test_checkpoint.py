"""Safe loading, clear errors and export of checkpoints (lmlab.checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmlab.checkpoint import export, load_model, main, read_checkpoint
from lmlab.errors import UserError
from lmlab.models.gpt import GPTLM, GPTConfig
from lmlab.tokenizers import Tokenizer
from lmlab.vocab import Vocabulary

from conftest import run_entry_point, serve_folder

VOCAB = ["<eos>", "<unk>", "the", "company", "said", *(f"w{i}" for i in range(11))]
REFUSED = "holds pickled code or objects"


def tiny_model(seed: int = 0) -> GPTLM:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=len(VOCAB), block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0
    )
    return GPTLM(config).eval()


def lmlab_checkpoint(model: GPTLM, **extra: object) -> dict:
    """What train.py writes, minus the Trainer's state."""
    return {
        "epoch": 0,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "lmlab": {"format": 1, "model_config": model.config.to_dict(), "vocab": list(VOCAB)},
        **extra,
    }


def save(obj: object, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class MakesMarker:
    """Unpickling this creates the file `path`: a stand-in for any code a checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_checkpoint(folder: Path, fmt: str) -> tuple[Path, Path]:
    """A valid lmlab checkpoint that also carries a MakesMarker; returns (checkpoint, marker)."""
    marker = folder / f"marker-{fmt}"
    checkpoint = lmlab_checkpoint(tiny_model(), payload=MakesMarker(marker))
    return save(checkpoint, folder / f"evil-{fmt}.ckpt", legacy=fmt == "legacy"), marker


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(folder, base URL): files in the folder are served over http://127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    with serve_folder(root) as base:
        yield root, base


def locate(path: Path, where: str, served: tuple[Path, str]) -> str:
    """`path` itself, or the URL of a copy in the served folder."""
    if where == "path":
        return str(path)
    root, base = served
    (root / path.name).write_bytes(path.read_bytes())
    return f"{base}/{path.name}"


# ---------------------------------------------------------------------------
# Proof of safety: the payload runs under plain pickle, never under lmlab.


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_payload_really_runs_when_unpickled(tmp_path, fmt):
    path, marker = evil_checkpoint(tmp_path, fmt)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


@pytest.mark.parametrize("where", ["path", "url"])
@pytest.mark.parametrize("force_unsafe", [False, True])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_load_model_refuses_code(tmp_path, served, monkeypatch, fmt, force_unsafe, where):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = evil_checkpoint(tmp_path, fmt)
    with pytest.raises(UserError, match=f"{REFUSED} \\(io.open\\): refusing to load it"):
        load_model(locate(path, where, served))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("script", "fmt", "force_unsafe", "where"),
    [
        ("generate.py", "zip", True, "url"),
        ("generate.py", "legacy", False, "path"),
        ("eval.py", "legacy", True, "url"),
        ("eval.py", "zip", True, "path"),
    ],
)
def test_entry_points_refuse_code(tmp_path, served, script, fmt, force_unsafe, where):
    path, marker = evil_checkpoint(tmp_path, fmt)
    env = {"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    if force_unsafe:
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    ckpt = locate(path, where, served)
    prompt = ["prompt=the company"] if script == "generate.py" else []
    result = run_entry_point(script, f"ckpt={ckpt}", *prompt, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and REFUSED in errors[0], result.stderr[-2000:]
    assert not marker.exists()


@dataclass
class Point:
    x: int


def test_allowlisted_objects_are_refused_too(tmp_path):
    """Whatever a process allowlists for torch's unpickler is still not a plain value."""
    path = save(lmlab_checkpoint(tiny_model(), extra=Point(1)), tmp_path / "point.ckpt")
    with (
        torch.serialization.safe_globals([Point]),
        pytest.raises(UserError, match=f"{REFUSED} \\(a .*Point at \\['extra'\\]\\)"),
    ):
        read_checkpoint(path)


# ---------------------------------------------------------------------------
# Loading: the model comes back, and every bad input gives one clear line.


@pytest.mark.parametrize("legacy", [False, True])
def test_load_model_rebuilds_the_model(tmp_path, legacy):
    model = tiny_model(seed=3)
    path = save(lmlab_checkpoint(model), tmp_path / "model.ckpt", legacy=legacy)
    loaded, vocab = load_model(path)
    assert vocab.words == VOCAB
    assert loaded.config == model.config and not loaded.training
    idx = torch.randint(0, len(VOCAB), (2, 9))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_load_model_from_url(tmp_path, served):
    model = tiny_model(seed=4)
    path = save(lmlab_checkpoint(model), tmp_path / "good.ckpt")
    loaded, _ = load_model(locate(path, "url", served))
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def _write(tmp_path: Path, kind: str) -> str:
    """A bad checkpoint of the given kind; returns what to pass as ckpt."""
    model = tiny_model()
    good = save(lmlab_checkpoint(model), tmp_path / "good.ckpt")
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return str(tmp_path / "nowhere.ckpt")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated zip":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "truncated legacy":
        legacy = save(lmlab_checkpoint(model), tmp_path / "legacy.ckpt", legacy=True)
        path.write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    elif kind == "text":
        path.write_text("the company said\n")
    elif kind == "bare state dict":
        save(model.state_dict(), path)
    elif kind == "tensor":
        save(torch.zeros(3), path)
    elif kind == "future format":
        checkpoint = lmlab_checkpoint(model)
        checkpoint["lmlab"]["format"] = 99
        save(checkpoint, path)
    elif kind == "wrong vocab size":
        checkpoint = lmlab_checkpoint(model)
        checkpoint["lmlab"]["vocab"] = VOCAB[:-1]
        save(checkpoint, path)
    elif kind == "wrong shapes":
        checkpoint = lmlab_checkpoint(model)
        checkpoint["lmlab"]["model_config"]["n_embd"] = 32
        save(checkpoint, path)
    elif kind == "folder":
        return str(tmp_path)
    return str(path)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", r"checkpoint .*nowhere\.ckpt not found; pass ckpt="),
        ("empty", r"checkpoint .* is empty"),
        ("truncated zip", r"is truncated or corrupted, or not a PyTorch checkpoint"),
        ("truncated legacy", r"is truncated or corrupted, or not a PyTorch checkpoint"),
        ("text", r"is truncated or corrupted, or not a PyTorch checkpoint"),
        ("bare state dict", r"is not an lmlab checkpoint: it has no 'lmlab' entry"),
        ("tensor", r"holds a Tensor, not an lmlab checkpoint"),
        ("future format", r"has lmlab checkpoint format 99; this lmlab reads format 1"),
        ("wrong vocab size", r"has 15 vocabulary words but a model config with vocab_size=16"),
        ("wrong shapes", r"does not match its own model config: .*size mismatch"),
        ("folder", r"is not an exported lmlab model: missing model\.safetensors"),
    ],
)
def test_load_model_errors(tmp_path, kind, message):
    with pytest.raises(UserError, match=message) as caught:
        load_model(_write(tmp_path, kind))
    assert "\n" not in str(caught.value)


def test_download_error_is_one_line(served):
    _, base = served
    with pytest.raises(UserError, match=r"could not download checkpoint .*/absent\.ckpt: "):
        load_model(f"{base}/absent.ckpt")


# ---------------------------------------------------------------------------
# Export: safetensors + JSON, read back by load_model.


def test_export_round_trip(tmp_path, capsys):
    model = tiny_model(seed=5)
    ckpt = save(lmlab_checkpoint(model), tmp_path / "model.ckpt")
    main(["export", str(ckpt), str(tmp_path / "exported")])
    assert "exported" in capsys.readouterr().out
    folder = tmp_path / "exported"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab.json",
    ]
    idx = torch.randint(0, len(VOCAB), (3, 16))
    for source in (folder, folder / "model.safetensors"):
        loaded, vocab = load_model(source)
        assert vocab.words == VOCAB
        assert loaded.lm_head.weight is loaded.token_embedding.weight  # still tied
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_an_export_goes_only_into_a_new_empty_or_exported_folder(tmp_path):
    model, vocab = tiny_model(), Tokenizer(Vocabulary(VOCAB))
    folder = export(model, vocab, tmp_path / "out")
    export(model, vocab, folder)  # over an earlier export
    export(model, vocab, folder, "hf")  # and the other format over it
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run / "train.log").write_text("")
    for target, others in ((run, "checkpoints, train.log"), (run / "checkpoints", "last.ckpt")):
        with pytest.raises(UserError, match=rf"holds other files \({others}\); pass a new"):
            export(model, vocab, target)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "train.log"]


def test_broken_export_is_refused(tmp_path):
    model = tiny_model()
    folder = export(model, Tokenizer(Vocabulary(VOCAB)), tmp_path / "out")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=r"model\.safetensors is truncated, corrupted"):
        load_model(folder)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"")
    with pytest.raises(UserError, match=r"is a bare safetensors file"):
        load_model(other)
