"""Dataset, batch collation and the train/validation split.

A sample is a dict so that optional parts (image, caption, labels) can be absent: a caption-only model builds the
dataset without ``image_dir``, and test data has no labels. `Collator` turns samples into the batch dict of
docs/DESIGN.md.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from multimodal.images import ImageLoadError, load_image
from multimodal.labels import LabelCodec
from multimodal.text import PAD_ID, caption_token_ids, pad_token_ids

__all__ = ["ImageCaptionDataset", "Collator", "train_val_split", "LABEL_PAD"]

LABEL_PAD = -100  # the default ignore_index of torch's cross-entropy
logger = logging.getLogger(__name__)


class ImageCaptionDataset(Dataset):
    """Rows of an annotation frame (`read_annotations`) as model-ready samples.

    Args:
        frame: DataFrame with ``ImageID``, ``Caption`` and optionally ``Labels``.
        image_dir: folder holding the images named by ``ImageID``; ``None`` for a dataset without images.
        codec: label codec; without it (or without a ``Labels`` column) the dataset is unlabelled.
        tokenizer: caption tokenizer; without it samples carry no caption ids.
        transform: maps an RGB PIL image to a tensor [3, H, W]; it must give a fixed size for batching. Defaults to
            a plain conversion to float in [0, 1].
        skip_bad_images: replace an unreadable image by zeros and flag it (``image_ok=False``) instead of raising.
        max_caption_length: captions are truncated to this many tokens.
        draft_size: passed to `load_image` (reduced-size JPEG decoding); ``None`` decodes at full size.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        image_dir: Optional[str | Path] = None,
        codec: Optional[LabelCodec] = None,
        tokenizer: Optional[Tokenizer] = None,
        transform: Optional[Callable[[Image.Image], torch.Tensor]] = None,
        skip_bad_images: bool = False,
        max_caption_length: int = 64,
        draft_size: Optional[int] = None,
    ) -> None:
        missing = {"ImageID", "Caption"} - set(frame.columns)
        if missing:
            raise ValueError(f"frame lacks column(s) {sorted(missing)}")
        self.frame = frame.reset_index(drop=True)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.codec = codec if "Labels" in frame.columns else None
        self.tokenizer = tokenizer
        self.transform = transform or _to_tensor
        self.skip_bad_images = skip_bad_images
        self.max_caption_length = max_caption_length
        self.draft_size = draft_size
        self._blank: Optional[torch.Tensor] = None

    @property
    def has_images(self) -> bool:
        return self.image_dir is not None

    @property
    def labelled(self) -> bool:
        return self.codec is not None

    def __len__(self) -> int:
        return len(self.frame)

    def image_path(self, index: int) -> Path:
        if self.image_dir is None:
            raise ValueError("this dataset was built without image_dir")
        return self.image_dir / self.frame.at[index, "ImageID"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample as a dict.

        Keys: ``index``, ``image_id``, ``image_ok``, ``error`` (None or the message of a skipped image) and, when
        configured, ``image`` [3, H, W], ``caption_ids`` (list of int, unpadded), ``targets`` [C] and ``label_seq``
        (class indices frequent-first, then the END index).

        Raises:
            ImageLoadError: naming the file, the row and the ImageID, unless ``skip_bad_images``.
        """
        index = int(index)
        row = self.frame.iloc[index]
        sample: dict[str, Any] = {"index": index, "image_id": row["ImageID"], "image_ok": True, "error": None}
        if self.image_dir is not None:
            sample["image"] = self._load(index, row["ImageID"], sample)
        if self.tokenizer is not None:
            sample["caption_ids"] = caption_token_ids(self.tokenizer, row["Caption"], self.max_caption_length)
        if self.codec is not None:
            sample["targets"] = torch.from_numpy(self.codec.encode(row["Labels"]))
            sample["label_seq"] = self.codec.sequence(row["Labels"]) + [self.codec.end_index]
        return sample

    def _load(self, index: int, image_id: str, sample: dict[str, Any]) -> torch.Tensor:
        path = self.image_path(index)
        try:
            image = load_image(path, self.draft_size)
        except ImageLoadError as err:
            error = ImageLoadError(path, f"row {index} (ImageID {image_id!r}): {err.reason}")
            if not self.skip_bad_images:
                raise error from err
            logger.warning("skipping unreadable image: %s", error)
            sample["image_ok"], sample["error"] = False, str(error)
            return self._blank_image()
        return self.transform(image)

    def _blank_image(self) -> torch.Tensor:
        """Zeros shaped like the transform's output (found once by transforming a grey image)."""
        if self._blank is None:
            self._blank = torch.zeros_like(self.transform(Image.new("RGB", (256, 256), (128, 128, 128))))
        return self._blank.clone()

    def check_images(self, strict: bool = True) -> list[tuple[int, str, Path]]:
        """Find missing image files up front (an existence check, no decoding), so a run fails fast.

        Args:
            strict: raise if any file is missing.

        Returns:
            ``(row, ImageID, path)`` of every missing file (empty for a dataset without images).

        Raises:
            ImageLoadError: listing the first missing files with their rows, when ``strict``.
        """
        if self.image_dir is None:
            return []
        missing = [
            (row, image_id, self.image_dir / image_id)
            for row, image_id in enumerate(self.frame["ImageID"])
            if not (self.image_dir / image_id).is_file()
        ]
        if missing and strict:
            listed = "; ".join(f"row {row} (ImageID {image_id!r}): {path}" for row, image_id, path in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ImageLoadError(self.image_dir, f"{len(missing)} image file(s) missing: {listed}{more}")
        return missing


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [3, H, W]


class Collator:
    """Batch samples of `ImageCaptionDataset` into the batch dict of docs/DESIGN.md.

    Captions are padded with ``pad_id`` to the longest caption of the batch, decoder label sequences with
    `LABEL_PAD` (-100) to the longest sequence. Keys whose parts the samples lack (images, captions, labels) are absent.
    """

    def __init__(self, pad_id: int = PAD_ID) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        first = samples[0]
        batch: dict[str, Any] = {}
        if "image" in first:
            batch["image"] = torch.stack([s["image"] for s in samples])  # [B, 3, H, W]
        if "image_features" in first:
            batch["image_features"] = torch.stack([s["image_features"] for s in samples])  # [B, F]
        batch["image_ok"] = torch.tensor([s["image_ok"] for s in samples], dtype=torch.bool)
        batch["error"] = [s.get("error") for s in samples]
        if "caption_ids" in first:
            ids, lengths = pad_token_ids([s["caption_ids"] for s in samples], self.pad_id)
            batch["caption_ids"], batch["caption_lengths"] = ids, lengths
        if "targets" in first:
            batch["targets"] = torch.stack([s["targets"] for s in samples]).float()  # [B, C]
            sequences = [s["label_seq"] for s in samples]
            label_seq = torch.full((len(samples), max(map(len, sequences))), LABEL_PAD, dtype=torch.long)
            for row, seq in enumerate(sequences):
                label_seq[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            batch["label_seq"] = label_seq  # [B, T]
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        batch["image_id"] = [s["image_id"] for s in samples]
        return batch


def train_val_split(frame: pd.DataFrame, val_fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random, reproducible split of the rows; each part keeps file order.

    Args:
        frame: annotation frame.
        val_fraction: share of rows for validation, in [0, 1); 0 gives an empty validation frame. A positive
            fraction gives at least one validation row.
        seed: seed of the numpy ``Generator`` drawing the permutation.

    Returns:
        ``(train_frame, val_frame)``, each with a fresh RangeIndex.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(frame)
    n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
    if n_val >= n and n_val > 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training rows out of {n}")
    permutation = np.random.default_rng(seed).permutation(n)
    val_rows, train_rows = np.sort(permutation[:n_val]), np.sort(permutation[n_val:])
    return frame.iloc[train_rows].reset_index(drop=True), frame.iloc[val_rows].reset_index(drop=True)
