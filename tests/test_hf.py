"""Hugging Face round trips: lmlab -> a transformers folder -> transformers, and back (gpt, llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # the hf extra, part of dev

from lmlab.checkpoint import export, load_model
from lmlab.decoding import generate
from lmlab.errors import UserError
from lmlab.finetune import VOCAB_ROWS, initialise_from
from lmlab.hf import export_hf, import_hf
from lmlab.models import build_model
from lmlab.models.gpt import GPTConfig
from lmlab.models.llama import LlamaConfig
from lmlab.models.lstm import LSTMConfig
from lmlab.tokenizers import Tokenizer, TokenizerSpec
from lmlab.vocab import Vocabulary

from conftest import run_entry_point

WORDS = ["<eos>", "<unk>", *(f"w{i}" for i in range(40)), "the", "company", "said", "N"]


def hf_load(folder: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def check_same_model(model, vocab: Tokenizer, folder: Path, lines: list[str]):
    """transformers' model and tokenizer of `folder` agree with lmlab's `model` and `vocab`;
    the tokenizer."""
    hf_model, tokenizer = hf_load(folder)
    for line in lines:  # PTB-style text: the corpus's own ids, <unk> for unknown words
        assert tokenizer(line, add_special_tokens=False).input_ids == vocab.encode(line)
        assert tokenizer(line).input_ids == [vocab.eos_id, *vocab.encode(line)]
    text = tokenizer(" ".join(lines)).input_ids
    ids = torch.tensor([text[:6], text[6:12], text[12:18]])  # (3, 6)
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    greedy = generate(model, ids, 8, temperature=0.0, eos_id=vocab.eos_id, stop_at_eos=True)
    hf_greedy = hf_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert hf_greedy.tolist() == greedy.tolist()
    assert greedy.shape[1] > ids.shape[1]  # it continued
    return tokenizer


def reexported_weights(folder: Path, tmp_path: Path) -> bytes:
    """The weights file after importing `folder` with hf: and exporting it again."""
    model, vocab = load_model(f"hf:{folder}")
    again = export(model, vocab, tmp_path / "again", "hf")
    return (again / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_gpt_checkpoint_exported_runs_in_transformers_and_comes_back(
    trained_run, corpus_dir, tmp_path
):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    folder = tmp_path / "hf_gpt"
    done = run_entry_point(
        "generate.py", f"ckpt={ckpt}", f"export={folder}", "export_format=hf", "device=cpu"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"exported {ckpt} to {folder}"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu"  # lmlab's exact GELU, not gelu_new
    card = (folder / "README.md").read_text()
    result = json.loads((trained_run / "result.json").read_text())
    assert str(corpus_dir) in card and f"steps {result['steps']}" in card
    assert f"ckpt={ckpt} export={folder} export_format=hf" in card

    model, vocab = load_model(ckpt)
    lines = (corpus_dir / "ptb.valid.txt").read_text().splitlines()[:5] + [" w1 zzyzx w2 N "]
    check_same_model(model, vocab, folder, lines)
    pipe = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    prompt = "the company said"
    text = pipe(prompt, add_special_tokens=True, max_new_tokens=6, do_sample=False)
    ids = torch.tensor([[vocab.eos_id, *vocab.encode(prompt)]])
    ours = generate(model, ids, 6, temperature=0.0, eos_id=vocab.eos_id, stop_at_eos=True)
    words = [vocab.words[i] for i in ours[0, ids.shape[1] :].tolist() if i > vocab.unk_id]
    assert text[0]["generated_text"] == " ".join([prompt, *words])  # <unk>, <eos>: special

    imported, imported_vocab = load_model(f"hf:{folder}")
    assert imported_vocab.words == vocab.words
    assert reexported_weights(folder, tmp_path) == (folder / "model.safetensors").read_bytes()


def tiny_llama() -> torch.nn.Module:
    """Grouped heads, an untied output layer, its own RoPE theta; weights large enough that
    the greedy choices are clear."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        block_size=16,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        dropout=0.0,
        rope_theta=500.0,
        norm_eps=1e-6,
        tie_embeddings=False,
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def test_llama_exported_runs_in_transformers_and_comes_back(tmp_path):
    model, vocab = tiny_llama(), Tokenizer(Vocabulary(WORDS))
    folder = export(model, vocab, tmp_path / "hf_llama", "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    lines = [" the company said w3 w5 ", " w7 N w9 zzyzx ", " w1 w2 w3 w4 w5 w6 w7 w8 w9 "]
    check_same_model(model, vocab, folder, lines)
    imported, _ = import_hf(f"hf:{folder}")
    for (name, ours), theirs in zip(model.state_dict().items(), imported.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert reexported_weights(folder, tmp_path) == (folder / "model.safetensors").read_bytes()


def test_gpt_without_biases_exports_zero_biases(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=len(WORDS),
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        dropout=0.0,
        bias=False,
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    vocab = Tokenizer(Vocabulary(WORDS))
    folder = export(model.eval(), vocab, tmp_path / "hf_gpt", "hf")
    check_same_model(
        model,
        vocab,
        folder,
        [" the company said w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 "],
    )


def tiny_gpt(vocab_size: int) -> torch.nn.Module:
    """The shape of `model=tiny` at `data.seq_len=16`; weights large enough that the greedy
    choices are clear."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = build_model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize(
    "kind, size, card",
    [("bpe", 120, "lmlab's BPE tokenizer of 120 tokens"), ("char", None, "a character tokenizer")],
)
def test_bpe_and_char_models_exported_run_in_transformers_and_come_back(
    kind, size, card, corpus_dir, tmp_path
):
    train = (corpus_dir / "ptb.train.txt").read_text().splitlines()
    vocab = TokenizerSpec(kind, size).train(train)
    model = tiny_gpt(len(vocab))
    folder = export(model, vocab, tmp_path / "hf", "hf")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        assert config["eos_token_id"] == config["bos_token_id"] == vocab.eos_id == 0, name
    assert card in (folder / "README.md").read_text()

    lines = (corpus_dir / "ptb.valid.txt").read_text().splitlines()[:5]
    lines += [" the zq <unk> company\tsaid  w1 "]  # unseen characters, a literal <unk>
    tokenizer = check_same_model(model, vocab, folder, lines)
    for line in lines:
        ids = [vocab.eos_id, *vocab.encode(line), vocab.unk_id, vocab.eos_id]
        assert tokenizer.decode(ids) == vocab.decode(ids)
    assert tokenizer.decode(vocab.encode(" the company  said ")) == "the company said"

    imported, imported_vocab = load_model(f"hf:{folder}")
    assert imported_vocab.kind == kind
    assert imported_vocab.to_dict() == vocab.to_dict() and imported_vocab.words == vocab.words
    assert reexported_weights(folder, tmp_path) == (folder / "model.safetensors").read_bytes()
    again = tmp_path / "again" / "tokenizer.json"
    assert again.read_bytes() == (folder / "tokenizer.json").read_bytes()

    # init_from=hf:DIR, as train.py calls it: a run of this tokenizer on the same training
    # split trains the same tokens (the tokenizers library may number BPE's tied ones in
    # another order; rows are matched by token), so every row keeps its trained value
    run_vocab = TokenizerSpec(kind, size).train(train)
    fresh = build_model(model.config)
    alignment = initialise_from(fresh, run_vocab, f"hf:{folder}")
    assert (alignment.kept, alignment.new, alignment.dropped) == (len(vocab), 0, 0)
    rows = [vocab.index[token] for token in run_vocab.words]
    trained = model.state_dict()
    for name, tensor in fresh.state_dict().items():
        expected = trained[name][rows] if name in VOCAB_ROWS else trained[name]
        assert torch.equal(tensor, expected), name


def test_bpe_export_writes_the_tokenizer_the_checkpoint_carries(corpus_dir, tmp_path):
    vocab = TokenizerSpec("bpe", 120).train((corpus_dir / "ptb.train.txt").read_text().split("\n"))
    folder = export(tiny_gpt(len(vocab)), vocab, tmp_path / "hf", "hf")
    exported = json.loads((folder / "tokenizer.json").read_text())
    # not a new tokenizer: the same JSON, with the <eos> before a prompt and a decoder added
    assert {**exported, "post_processor": None, "decoder": None} == vocab.to_dict()["hf"]
    assert [(t["id"], t["content"], t["special"]) for t in exported["added_tokens"]] == [
        (0, "<eos>", True),
        (1, "<unk>", True),
    ]


def test_lstm_export_to_hf_is_refused(tmp_path):
    model = build_model(LSTMConfig(vocab_size=len(WORDS), n_layer=1, n_embd=8, n_hidden=8))
    with pytest.raises(UserError, match=r"^the lstm family has no transformers class; export"):
        export_hf(model, Tokenizer(Vocabulary(WORDS)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def llama_folder(tmp_path) -> Path:
    return export(tiny_llama(), Tokenizer(Vocabulary(WORDS)), tmp_path / "hf_llama", "hf")


def test_import_refuses_what_lmlab_cannot_hold(llama_folder: Path, tmp_path: Path):
    config, weights = llama_folder / "config.json", llama_folder / "model.safetensors"
    original = config.read_text()
    rows = [
        ({"model_type": "bert"}, r"is a 'bert' model; lmlab imports gpt2 \(family gpt\) and llama"),
        ({"hidden_act": "gelu"}, r"has hidden_act='gelu': lmlab's llama uses SwiGLU with silu"),
        ({"attention_bias": True}, r"has attention_bias=True: lmlab's llama has no biases"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            r"rope type='llama3': lmlab's llama has plain RoPE",
        ),
        ({"vocab_size": 99}, r"the tokenizer has 46 tokens but vocab_size is 99"),
    ]
    for changes, message in rows:
        config.write_text(original)
        edit_json(config, **changes)
        with pytest.raises(UserError, match=message) as caught:
            import_hf(f"hf:{llama_folder}")
        assert "\n" not in str(caught.value)
    config.write_text(original)

    tokenizer = llama_folder / "tokenizer.json"
    kept = tokenizer.read_text()
    data = json.loads(kept)
    foreign = [  # GPT-2's byte-level BPE; a SentencePiece-style Unigram
        ({"type": "BPE", "vocab": {}, "merges": []}, r"is a BPE tokenizer lmlab did not write"),
        ({"type": "Unigram", "vocab": []}, r"is a Unigram tokenizer; lmlab reads word-level"),
    ]
    for model, message in foreign:
        tokenizer.write_text(json.dumps({**data, "model": model, "pre_tokenizer": None}))
        with pytest.raises(UserError, match=message):
            import_hf(f"hf:{llama_folder}")
    tokenizer.write_text(kept)

    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=r"model.safetensors is truncated or corrupted"):
        import_hf(f"hf:{llama_folder}")
    weights.unlink()
    torch.save({"w": torch.zeros(1)}, llama_folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no model.safetensors \(pytorch_model.bin is pickled"):
        import_hf(f"hf:{llama_folder}")
    with pytest.raises(UserError, match=r"is not a folder; pass hf:DIR"):
        import_hf(f"hf:{tmp_path / 'absent'}")


def test_gpt2_with_tanh_gelu_is_refused(tmp_path):
    folder = tmp_path / "gpt2"
    config = transformers.GPT2Config(
        vocab_size=len(WORDS), n_positions=8, n_embd=8, n_layer=1, n_head=2
    )
    config.save_pretrained(folder)  # the GPT-2 default: activation_function="gelu_new"
    with pytest.raises(UserError, match=r"activation_function='gelu_new': lmlab's gpt computes"):
        import_hf(f"hf:{folder}")
