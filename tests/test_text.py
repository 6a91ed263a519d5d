"""Caption tokenizer: vocabulary, special ids, padding, truncation and save/load."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models

from multimodal.annotations import read_annotations
from multimodal.text import (
    PAD_ID,
    UNK_ID,
    encode_captions,
    load_caption_tokenizer,
    train_caption_tokenizer,
)

CAPTIONS = ["A dog runs.", "A DOG sleeps, happily!", "two dogs", "A cat"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_caption_tokenizer(CAPTIONS, min_frequency=1)


def test_special_ids_and_normalisation(tokenizer):
    assert tokenizer.token_to_id("<pad>") == PAD_ID == 0 and tokenizer.token_to_id("<unk>") == UNK_ID == 1
    assert tokenizer.encode("A Dog, sleeps!").tokens == ["a", "dog", ",", "sleeps", "!"]
    assert tokenizer.encode("A dog zebra").ids[-1] == UNK_ID
    assert tokenizer.encode('"dog."').tokens == ['<unk>', "dog", ".", '<unk>']  # each punctuation mark alone


def test_min_frequency_drops_rare_words():
    vocab = train_caption_tokenizer(CAPTIONS, min_frequency=2).get_vocab()
    assert {"a", "dog"} <= set(vocab) and "cat" not in vocab and "sleeps" not in vocab


def test_encode_captions_pads_truncates_and_keeps_empty(tokenizer):
    ids, lengths = encode_captions(tokenizer, ["A dog runs.", "", "cat"], max_length=3)
    assert ids.dtype == lengths.dtype == torch.long
    assert ids.shape == (3, 3) and lengths.tolist() == [3, 0, 1]
    assert ids[0].tolist() == tokenizer.encode("A dog runs").ids
    assert ids[1].tolist() == [PAD_ID] * 3
    assert ids[2, 1:].tolist() == [PAD_ID] * 2 and ids[2, 0] != PAD_ID
    ids, lengths = encode_captions(tokenizer, ["", ""])
    assert ids.shape == (2, 1) and lengths.tolist() == [0, 0] and ids.eq(PAD_ID).all()
    ids, lengths = encode_captions(tokenizer, [None, float("nan")])  # missing captions (pandas: NaN) are empty
    assert lengths.tolist() == [0, 0] and ids.eq(PAD_ID).all()


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = load_caption_tokenizer(path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    captions = CAPTIONS + ["An unseen caption!"]
    for a, b in zip(encode_captions(loaded, captions), encode_captions(tokenizer, captions)):
        assert torch.equal(a, b)


def test_load_rejects_foreign_special_ids(tmp_path):
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1}, unk_token="<unk>")).save(str(path))
    with pytest.raises(ValueError, match="<pad>=0"):
        load_caption_tokenizer(path)


@pytest.mark.comp5329
def test_real_captions(comp5329_dir):
    train = read_annotations(comp5329_dir / "train.csv")
    test = read_annotations(comp5329_dir / "test.csv")
    tokenizer = train_caption_tokenizer(train["Caption"])
    ids, lengths = encode_captions(tokenizer, list(test["Caption"]))
    assert ids.shape[0] == 1000 and lengths.min() > 0
    assert ids.eq(UNK_ID).sum() / lengths.sum() < 0.05  # training vocabulary covers test captions
