"""Against the real Penn Treebank, where ../shared/data/ptb holds it (CI does)."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from lmlab.data import LMDataModule

PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"
CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "ptb.yaml"

pytestmark = pytest.mark.skipif(not (PTB / "ptb.train.txt").is_file(), reason="no local PTB copy")


def test_real_ptb_token_counts_and_vocabulary(tmp_path):
    conf = yaml.safe_load(CONF.read_text())
    dm = LMDataModule(
        data_dir=str(PTB), files=conf["files"], md5=conf["md5"], cache_dir=str(tmp_path)
    )
    dm.prepare_data()  # verifies the md5 values from conf/data/ptb.yaml
    dm.setup()
    counts = {split: len(tokens) for split, tokens in dm.tokens.items()}
    assert counts == {"train": 929_589, "valid": 73_760, "test": 82_430}
    vocab = dm.vocab
    assert len(vocab) == 10_000
    assert vocab.words[:2] == ["<eos>", "<unk>"]
    assert vocab.words[2] == "the"
    # every validation and test word is in the training vocabulary: PTB has no OOV
    assert int((np.asarray(dm.tokens["valid"]) == vocab.unk_id).sum()) == sum(
        line.split().count("<unk>") for line in (PTB / "ptb.valid.txt").read_text().splitlines()
    )
