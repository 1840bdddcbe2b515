from lmlab.vocab import EOS, UNK, Vocabulary, tokenize


def test_tokenize_splits_on_whitespace_and_ends_with_eos():
    assert tokenize(" the company said N \n") == ["the", "company", "said", "N", EOS]
    assert tokenize("") == [EOS]


def test_build_orders_by_frequency_then_alphabet_with_specials_first():
    vocab = Vocabulary.build(["b a b <unk>", "c b a <eos>"])
    assert vocab.words == [EOS, UNK, "b", "a", "c"]
    assert (vocab.eos_id, vocab.unk_id) == (0, 1)


def test_encode_maps_unknown_words_to_unk_and_decode_inverts():
    vocab = Vocabulary.build(["the cat sat"])
    ids = vocab.encode(["the", "dog", "sat", EOS])
    assert ids == [vocab.index["the"], vocab.unk_id, vocab.index["sat"], vocab.eos_id]
    assert vocab.decode(ids) == "the <unk> sat <eos>"
    assert vocab.unknown(["the", "dog", "emu", "dog"]) == ["dog", "emu"]


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["über straße the", "the"])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.words == vocab.words
    assert loaded.encode(["straße"]) == vocab.encode(["straße"])
    assert (tmp_path / "vocab.json").read_text().startswith("{")  # JSON, never pickle
