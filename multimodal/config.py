"""Configuration dataclasses: one frozen dataclass per concern.

`ModelConfig` is stored as JSON inside every exported model so that `predict.py` rebuilds the network from the
checkpoint alone. `DataConfig` and `TrainConfig` describe a run and are written next to it (`run_config.json`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

COMBINE_RULES = ("fused", "fused_decoder", "mean")
CAPTION_POOLS = ("max", "mean", "last")
# How evaluation fits an image to the square input: "center" is timm's default (short side resized to
# size / crop_pct, then the centre square cut out: a 4:3 photo loses a third of its width); "full" resizes the whole
# image to size x size (timm's crop_mode="squash" with crop_pct=1), so objects near the borders are kept.
IMAGE_CROPS = ("center", "full")
# Arguments a resumed run (`train.py --resume`) takes from its command line instead of the saved run configuration:
# how it reads its data, not what it trains. `--skip-bad-images` given on resuming turns skipping on (a run stopped by
# an unreadable image continues without it); a run that skipped keeps skipping; `--[no-]verify-images` applies when
# given, else the run's own setting.
RESUME_OVERRIDES = ("resume", "workers", "skip_bad_images", "verify_images")


class UsageError(ValueError):
    """Settings or inputs that cannot work together (the scripts print the message as one ``error:`` line)."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of `MultimodalClassifier`.

    A branch is switched off by setting its defining field to ``None``/``False``: ``image_encoder=None`` (no image
    branch), ``vocab_size=None`` (no caption branch), ``use_decoder=False`` (no label decoder). A switched-off branch
    has no modules and no parameters.

    ``combine`` says how the final label probabilities are formed:
        - ``"fused"``: sigmoid of the fused head (a linear head over the concatenated embeddings of the branches that
          are on). The decoder, when on, still trains jointly and regularises the shared encoders.
        - ``"fused_decoder"``: ``(1 - decoder_weight) * p_fused + decoder_weight * p_decoder`` where ``p_decoder`` are
          the per-label scores of the decoder's beam search.
        - ``"mean"``: the mean of the sigmoid probabilities of every BCE head (image, caption, fused), like the
          late fusion of the 2020 report; plus the decoder as in ``"fused_decoder"`` when ``decoder_weight > 0`` and
          the decoder is on.
    """

    num_labels: int
    # Image branch.
    image_encoder: Optional[str] = "tf_efficientnet_lite0"
    image_size: int = 224
    image_crop: str = "center"  # evaluation preprocessing: "center" crop (timm's default) or the "full" image
    image_drop_rate: float = 0.2
    # Class-specific residual attention (CSRA) over the last feature map, added with this weight to the image and
    # fused heads' logits (0: off, global average pooling only); see `model.residual_attention`.
    image_attention: float = 0.0
    image_attention_temperature: float = 1.0
    # Caption branch.
    vocab_size: Optional[int] = None
    pad_id: int = 0
    word_dim: int = 128
    caption_hidden: int = 256
    caption_layers: int = 1
    bidirectional: bool = True
    caption_pool: str = "max"
    caption_embed_dropout: float = 0.0  # dropout on the word embeddings (training only)
    caption_word_skip: bool = False  # append the max over word embeddings to the pooled LSTM states
    caption_bigram_buckets: int = 0  # > 0: append a mean bag of word + hashed-bigram embeddings
    # Training only: each word of a caption becomes <unk> with this probability, so that the <unk> embedding, which
    # words unseen in training map to, is learned (with no rare words folded into <unk>, it never is otherwise).
    caption_word_dropout: float = 0.0
    max_caption_length: int = 64  # caption tokens kept, in training and in prediction alike
    # Label decoder (CNN-RNN).
    use_decoder: bool = True
    label_embed_dim: int = 128
    decoder_hidden: int = 256
    max_labels: int = 8
    beam_width: int = 3
    # Fusion.
    dropout: float = 0.2
    fusion_hidden: int = 0  # 0: linear fused head; > 0: MLP with this many hidden units
    modality_dropout: float = 0.0  # training: per sample, drop one branch's embedding from the fused input
    combine: str = "fused"
    decoder_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.image_encoder is None and self.vocab_size is None:
            raise ValueError("at least one of the image and caption branches must be on")
        if self.combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {COMBINE_RULES}, got {self.combine!r}")
        if self.image_crop not in IMAGE_CROPS:
            raise ValueError(f"image_crop must be one of {IMAGE_CROPS}, got {self.image_crop!r}")
        if self.caption_pool not in CAPTION_POOLS:
            raise ValueError(f"caption_pool must be one of {CAPTION_POOLS}, got {self.caption_pool!r}")
        if self.combine == "fused_decoder" and not self.use_decoder:
            raise ValueError("combine='fused_decoder' needs use_decoder=True")
        if self.max_caption_length < 1:
            raise ValueError(f"max_caption_length must be >= 1, got {self.max_caption_length}")
        if not 0.0 <= self.caption_word_dropout < 1.0:
            raise ValueError(f"caption_word_dropout must be in [0, 1), got {self.caption_word_dropout}")
        if not 0.0 <= self.modality_dropout <= 0.5:
            raise ValueError(f"modality_dropout must be in [0, 0.5], got {self.modality_dropout}")
        if self.image_attention < 0 or self.image_attention_temperature <= 0:
            raise ValueError(f"image_attention must be >= 0 and its temperature > 0, got {self.image_attention} and "
                             f"{self.image_attention_temperature}")
        if self.image_attention > 0 and self.fusion_hidden:
            raise ValueError("image_attention needs the linear fused head (fusion_hidden=0)")
        if not 0.0 <= self.decoder_weight <= 1.0:
            raise ValueError(f"decoder_weight must be in [0, 1], got {self.decoder_weight}")

    @property
    def use_image(self) -> bool:
        return self.image_encoder is not None

    @property
    def use_caption(self) -> bool:
        return self.vocab_size is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the joint loss terms; a term whose branch is off is simply absent."""

    image_weight: float = 1.0
    caption_weight: float = 1.0
    fused_weight: float = 1.0
    decoder_weight: float = 1.0
    pos_weight: Optional[tuple[float, ...]] = None
    focal_gamma: float = 0.0
    label_smoothing: float = 0.0
    # Asymmetric loss (Ridnik et al. 2021) in place of BCE when asl_gamma_neg > 0: negatives' terms weighted by
    # p_m ** gamma_neg with p_m = max(p - asl_clip, 0), positives' by (1 - p) ** asl_gamma_pos
    asl_gamma_neg: float = 0.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (`published`), so neither a crash nor a power loss leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with published(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


@contextlib.contextmanager
def published(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Write a file whole or not at all: yields a `private_temporary` name beside ``path`` to write; when the block
    ends it is flushed to disk and renamed to ``path`` (replacing any earlier file, or the same file another process
    published meanwhile), and the folder's entry flushed too. A block that raises leaves nothing: its file is
    deleted."""
    path = Path(path)
    tmp = private_temporary(path, suffix)
    try:
        yield tmp
        fsync(tmp)  # the contents reach the disk before the rename that publishes them
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def private_temporary(path: str | Path, suffix: str = ".tmp") -> Path:
    """A temporary name beside ``path`` that no other process uses (process id and a random part), for a file that
    is renamed to ``path`` once complete: two processes writing the same file never write into one temporary file,
    and one never deletes the other's. `remove_stale_temporaries` finds the ones a killed process left."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMPORARY_MARK}{suffix}")


TEMPORARY_MARK = ".partial"
STALE_SECONDS = 24 * 3600


# The temporary names of the caches before `private_temporary` (one shared by every writer), left by killed builds.
LEGACY_TEMPORARIES = ("*.tmp.npy", "*.tmp.json", "*.safetensors.tmp")


def remove_stale_temporaries(folder: str | Path, max_age: float = STALE_SECONDS, of: Optional[str] = None
                             ) -> list[Path]:
    """Delete the temporary files of a cache folder (`private_temporary`'s, and the older ones') untouched for
    ``max_age`` seconds (left by a killed process: a writer still at work touches its file); returns them. With
    ``of`` (a file name), only the `private_temporary` files of that file: in a folder that is not a cache's."""
    removed = []
    now = time.time()
    patterns = (f"*{TEMPORARY_MARK}*", *LEGACY_TEMPORARIES) if of is None else (f"{of}.*{TEMPORARY_MARK}*",)
    for path in {p for pattern in patterns for p in Path(folder).glob(pattern)}:
        try:
            if path.is_file() and now - path.stat().st_mtime > max_age:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # removed by another process meanwhile
            pass
    return removed


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries (a rename into it), to disk. Contents must reach the disk before the
    rename that publishes them: otherwise a power loss can keep the rename and lose the contents. Folders cannot be
    opened on some systems (Windows); there the rename is left to the file system."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """`fsync` every file under ``root`` and every folder, ``root`` included."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync(os.path.join(folder, name))
        fsync(folder)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    try:  # numpy scalars and arrays
        return obj.tolist()
    except AttributeError:
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}") from None
