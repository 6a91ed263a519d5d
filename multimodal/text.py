"""Caption tokenizer: a word-level vocabulary built with Hugging Face `tokenizers`.

Captions are short (about 10 words), so a word vocabulary learned from the training captions is enough for the LSTM
caption encoder. The tokenizer is saved as ``tokenizer.json`` next to the model so that prediction uses exactly the
vocabulary the model was trained with.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

__all__ = [
    "PAD_ID", "UNK_ID", "PAD_TOKEN", "UNK_TOKEN", "train_caption_tokenizer", "load_caption_tokenizer",
    "caption_token_ids", "encode_captions", "pad_token_ids",
]

PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


def train_caption_tokenizer(captions: Iterable[str], min_frequency: int = 1) -> Tokenizer:
    """Learn a lower-cased word vocabulary from captions.

    Pass the training captions only, so validation and test words the model never saw map to ``<unk>``.

    Args:
        captions: training captions.
        min_frequency: words seen fewer times become ``<unk>``.

    Returns:
        A WordLevel tokenizer (NFKC + lower-case, split on white space and each punctuation mark) with
        ``<pad>`` = `PAD_ID` and ``<unk>`` = `UNK_ID`.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, special_tokens=[PAD_TOKEN, UNK_TOKEN])
    tokenizer.train_from_iterator((str(c) for c in captions), trainer=trainer)
    _check_special_tokens(tokenizer, "trained tokenizer")
    return tokenizer


def load_caption_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` saved with ``tokenizer.save(path)``, checking its special token ids."""
    tokenizer = Tokenizer.from_file(str(path))
    _check_special_tokens(tokenizer, str(path))
    return tokenizer


def _check_special_tokens(tokenizer: Tokenizer, where: str) -> None:
    ids = (tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(UNK_TOKEN))
    if ids != (PAD_ID, UNK_ID):
        raise ValueError(f"{where}: expected {PAD_TOKEN}={PAD_ID} and {UNK_TOKEN}={UNK_ID}, got ids {ids}")


def caption_text(caption: Any) -> str:
    """A caption as text: ``None`` and NaN (pandas' empty cell) are the empty caption, anything else ``str``."""
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        return ""
    return str(caption)


def caption_token_ids(tokenizer: Tokenizer, caption: str, max_length: int = 64) -> list[int]:
    """Token ids of one caption, truncated to ``max_length`` (empty list for an empty caption, ``None`` or NaN)."""
    return tokenizer.encode(caption_text(caption)).ids[:max_length]


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to the longest one (at least 1 column, so an all-empty batch still has a valid shape).

    Returns:
        ``ids`` LongTensor [B, L] padded with ``pad_id`` and ``lengths`` LongTensor [B].
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), max([1, *map(len, sequences)])), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids, lengths


def encode_captions(
    tokenizer: Tokenizer, captions: Sequence[str], max_length: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and pad a batch of captions.

    Args:
        tokenizer: a caption tokenizer (`train_caption_tokenizer` / `load_caption_tokenizer`).
        captions: B captions; an empty caption (or ``None``, or NaN) gives length 0 and an all-pad row.
        max_length: longer captions are truncated to their first ``max_length`` tokens.

    Returns:
        ``ids`` LongTensor [B, L] (L = longest caption in the batch, at most ``max_length``) and ``lengths``
        LongTensor [B].
    """
    encodings = tokenizer.encode_batch([caption_text(c) for c in captions]) if len(captions) else []
    return pad_token_ids([e.ids[:max_length] for e in encodings])
