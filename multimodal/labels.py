"""`LabelCodec`: the mapping between the dataset's label ids and the model's class indices.

The COMP5329 labels are COCO category ids 1..19 with 12 missing, so ids are not indices. The codec fixes the class
order once (sorted ids seen in training), is saved with every model, and also supplies the label order used as the
target of the CNN-RNN label decoder.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from multimodal.annotations import AnnotationError
from multimodal.config import save_json

__all__ = ["LabelCodec", "UnknownLabelError", "load_names"]

Names = Union[Mapping[int, str], str, Path, None]


class UnknownLabelError(KeyError, ValueError):
    """A label id that is not one of the codec's classes (catchable as ``KeyError`` or ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def load_names(csv_path: str | Path) -> dict[int, str]:
    """Read class names from a ``label,name`` CSV such as COMP5329's ``label_names.csv``."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"label", "name"} <= set(reader.fieldnames):
                raise AnnotationError(csv_path, 1, f"expected columns 'label,name', got {reader.fieldnames}")
            names = {}
            for line, row in enumerate(reader, start=2):
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise AnnotationError(csv_path, line, f"label {row['label']!r} is not an integer") from None
                if row["name"] is None:
                    raise AnnotationError(csv_path, line, f"label {label} has no name (expected 'label,name')")
                names[label] = row["name"].strip()
    except UnicodeDecodeError as error:
        raise AnnotationError(csv_path, None, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    return names


class LabelCodec:
    """Label ids <-> class indices, multi-hot encoding, thresholded decoding and decoder label sequences.

    Args:
        label_ids: original label ids in class-index order.
        names: class name per label id (a mapping or a ``label,name`` CSV); ids without a name are named by their id.
        frequencies: training frequency of each class, in class-index order; orders `sequence`.
    """

    def __init__(
        self,
        label_ids: Sequence[int],
        names: Names = None,
        frequencies: Optional[Sequence[int]] = None,
    ) -> None:
        self.label_ids = tuple(int(i) for i in label_ids)
        if not self.label_ids:
            raise ValueError("a LabelCodec needs at least one class")
        if len(set(self.label_ids)) != len(self.label_ids):
            raise ValueError(f"duplicate label ids: {self.label_ids}")
        self._index = {label: i for i, label in enumerate(self.label_ids)}
        if names is not None and not isinstance(names, Mapping):
            names = load_names(names)
        self.names = tuple(str((names or {}).get(label, label)) for label in self.label_ids)
        self.frequencies = tuple(int(f) for f in frequencies) if frequencies is not None else (0,) * self.num_labels
        if len(self.frequencies) != self.num_labels:
            raise ValueError(f"{len(self.frequencies)} frequencies for {self.num_labels} classes")
        # Frequent first, ties by smaller index: the fixed label order of the decoder's targets.
        order = sorted(range(self.num_labels), key=lambda i: (-self.frequencies[i], i))
        self._rank = {index: rank for rank, index in enumerate(order)}

    @classmethod
    def from_labels(cls, label_tuples: Iterable[Iterable[int]], names: Names = None) -> "LabelCodec":
        """Build the codec from training labels: classes are the sorted distinct ids seen, with their frequencies."""
        counts = Counter(int(label) for labels in label_tuples for label in set(labels))
        label_ids = sorted(counts)
        return cls(label_ids, names=names, frequencies=[counts[label] for label in label_ids])

    @property
    def num_labels(self) -> int:
        return len(self.label_ids)

    @property
    def end_index(self) -> int:
        """Index of the decoder's END token, just after the classes."""
        return self.num_labels

    @property
    def start_index(self) -> int:
        """Index of the decoder's START token."""
        return self.num_labels + 1

    def __len__(self) -> int:
        return self.num_labels

    def __repr__(self) -> str:
        return f"LabelCodec(label_ids={self.label_ids})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelCodec) and self.to_dict() == other.to_dict()

    def index(self, label: int) -> int:
        """Class index of an original label id."""
        try:
            return self._index[int(label)]
        except KeyError:
            raise UnknownLabelError(f"unknown label id {label!r}; known ids: {list(self.label_ids)}") from None

    def encode(self, labels: Iterable[int]) -> np.ndarray:
        """Multi-hot float32 vector [C] of a set of original label ids."""
        target = np.zeros(self.num_labels, dtype=np.float32)
        for label in labels:
            target[self.index(label)] = 1.0
        return target

    def decode(
        self, probs: Sequence[float] | np.ndarray, thresholds: Optional[float | Sequence[float] | np.ndarray] = 0.5
    ) -> tuple[int, ...]:
        """Original label ids whose probability reaches its threshold (possibly none: `MultimodalClassifier.predict`
        and `predict.py` give the top label then).

        Args:
            probs: probabilities [C] of one sample (numpy array, list or CPU tensor).
            thresholds: one threshold for all classes, or one per class [C]; ``None`` (a model that stores none): 0.5.
        """
        thresholds = 0.5 if thresholds is None else thresholds
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (self.num_labels,):
            raise ValueError(f"expected probabilities of shape ({self.num_labels},), got {probs.shape}")
        thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), probs.shape)
        return tuple(self.label_ids[i] for i in np.flatnonzero(probs >= thresholds))

    def sequence(self, labels: Iterable[int]) -> list[int]:
        """Class indices of ``labels`` frequent-first (ties by smaller index), as in Wang et al. 2016 (CNN-RNN).

        A fixed order makes the decoder's target unique for a label set; putting frequent labels first lets it emit
        the easy labels before the rare ones. Repeated ids count once. The decoder target is this plus `end_index`.
        """
        return sorted({self.index(label) for label in labels}, key=self._rank.__getitem__)

    def to_dict(self) -> dict:
        return {"label_ids": list(self.label_ids), "names": list(self.names), "frequencies": list(self.frequencies)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LabelCodec":
        names = dict(zip(data["label_ids"], data["names"])) if "names" in data else None
        return cls(data["label_ids"], names=names, frequencies=data.get("frequencies"))

    def save(self, path: str | Path) -> None:
        save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "LabelCodec":
        return cls.from_dict(json.loads(Path(path).read_text()))

    load_names = staticmethod(load_names)
