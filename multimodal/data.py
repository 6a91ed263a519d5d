"""Dataset, batch collation and the train/validation split.

A sample is a dict so that optional parts (image, caption, labels) can be absent: a caption-only model builds the
dataset without ``image_dir``, and test data has no labels. `Collator` turns samples into the batch dict of
docs/DESIGN.md.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tokenizers import Tokenizer
from torch.utils.data import Dataset, default_collate, get_worker_info
from tqdm.auto import tqdm

from multimodal.config import UsageError, fsync, published, remove_stale_temporaries, save_json
from multimodal.images import (EncodedImageDecoder, ImageLoadError, image_cache_settings, load_image,
                               resize_for_cache, update_files_digest)
from multimodal.labels import LabelCodec
from multimodal.text import PAD_ID, caption_token_ids, pad_token_ids

__all__ = ["ImageCaptionDataset", "Collator", "train_val_split", "LABEL_PAD", "ImageCache", "build_image_cache",
           "build_model_image_cache", "bounded_heap_worker_init", "decode_images"]

LABEL_PAD = -100  # the default ignore_index of torch's cross-entropy
CHECK_CHUNK = 256  # images per task of `ImageCaptionDataset.check_images`'s decoding threads
logger = logging.getLogger(__name__)


def _as_cached(image: torch.Tensor) -> torch.Tensor:
    """The transform of cached images when none is given: the uint8 image as it is, transformed later, batched,
    where the model runs."""
    return image


def batch_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a batch. In a DataLoader worker it is allocated in shared memory, as torch's
    `default_collate` allocates its output, so that handing the batch to the main process copies nothing."""
    if get_worker_info() is not None:
        try:
            elem = torch.empty(0, dtype=dtype)
            storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
            return elem.new(storage).resize_(*shape)
        except (AttributeError, RuntimeError, TypeError):  # torch's private API moved: ordinary memory (one copy more)
            pass
    return torch.empty(tuple(shape), dtype=dtype)


def row_name(row: int, image_id: str) -> str:
    """How errors name a row of an annotation file: ``row`` 0-based, named 1-based as "data row N" (the first row
    after the header is 1), with its ImageID."""
    return f"data row {row + 1} (ImageID {image_id!r})"


def row_error(path: str | Path, row: int, image_id: str, reason: str) -> ImageLoadError:
    """The error of an unreadable image, naming its file, its row of the annotation file and its ImageID."""
    return ImageLoadError(path, f"{row_name(row, image_id)}: {reason}")


class SampleBatch(list):
    """The samples of one batch, as `ImageCaptionDataset.__getitems__` returns them; ``images``, when set, holds
    their images already stacked [B, ...] (each sample's ``image`` is a view of it)."""

    images: Optional[torch.Tensor] = None


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
        image_cache: read images from this pre-resized uint8 cache (`ImageCache`) instead of decoding the files.
            The sample's ``image`` is then the cached uint8 tensor [S, S, 3] (``transform``, if given, is applied
            to that tensor), to be preprocessed batched on the device by `images.BatchImageTransform`.
        encoded_images: samples carry the image file's bytes (``image_file``) and where it came from
            (``image_source``: path and row) instead of an image: the batch is decoded where the model runs, by
            `decode_images` (nvJPEG on a GPU). A missing file is reported here, with its row, as any unreadable image.
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
        image_cache: Optional["ImageCache"] = None,
        encoded_images: bool = False,
    ) -> None:
        missing = {"ImageID", "Caption"} - set(frame.columns)
        if missing:
            raise ValueError(f"frame lacks column(s) {sorted(missing)}")
        self.frame = frame.reset_index(drop=True)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.codec = codec if "Labels" in frame.columns else None
        # The columns as plain lists: a pandas row lookup per sample cost a DataLoader worker more than reading the
        # image from the uint8 cache (benchmarks/SPEED.md, section 2.1).
        self._ids: list[str] = self.frame["ImageID"].tolist()
        self._captions: list[str] = self.frame["Caption"].tolist()
        self._labels: Optional[list[Any]] = self.frame["Labels"].tolist() if self.codec is not None else None
        self._rows: Optional[list[int]] = [int(r) for r in self.frame["_row"]] if "_row" in self.frame.columns \
            else None
        self.tokenizer = tokenizer
        self.transform = transform or _to_tensor
        self.skip_bad_images = skip_bad_images
        self.max_caption_length = max_caption_length
        self.draft_size = draft_size
        self.image_cache = image_cache
        self.encoded_images = encoded_images
        if encoded_images and image_cache is not None:
            raise ValueError("encoded_images reads the image files; it cannot be combined with an image cache")
        if image_cache is not None:  # without a transform: the uint8 images as they are (see `__getitems__`)
            self.transform = transform or _as_cached
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
        return self.image_dir / self._ids[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample as a dict.

        Keys: ``index``, ``image_id``, ``image_ok``, ``error`` (None or the message of a skipped image) and, when
        configured, ``image`` [3, H, W], ``caption_ids`` (list of int, unpadded), ``targets`` [C] and ``label_seq``
        (class indices frequent-first, then the END index).

        Raises:
            ImageLoadError: naming the file, the row and the ImageID, unless ``skip_bad_images``.
        """
        return self._sample(int(index))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch of samples (the DataLoader calls this instead of ``__getitem__`` per sample). From the uint8 image
        cache without a per-sample transform, the batch's images are read in one copy, and the returned list's
        ``images`` [B, S, S, 3] lets `Collator` use them as they are instead of copying them again; otherwise, or if
        an image of the batch is not readable from the cache, it is ``[self[i] for i in indices]``."""
        indices = [int(i) for i in indices]
        raw = (self.image_cache is not None and self.transform is _as_cached and self.image_dir is not None
               and type(self).__getitem__ is ImageCaptionDataset.__getitem__)  # a subclass's own samples: per sample
        block = self.image_cache.images([self._ids[i] for i in indices]) if raw else None
        if block is None:
            return [self[i] for i in indices]
        batch = SampleBatch(self._sample(i, image=block[k]) for k, i in enumerate(indices))
        batch.images = block
        return batch

    def _sample(self, index: int, image: Optional[torch.Tensor] = None) -> dict[str, Any]:
        image_id = self._ids[index]
        sample: dict[str, Any] = {"index": index, "image_id": image_id, "image_ok": True, "error": None}
        if image is not None:
            sample["image"] = image
        elif self.image_dir is not None and self.encoded_images:
            sample["image_file"] = self._read_file(index, image_id, sample)
            sample["image_source"] = (str(self.image_path(index)), self.source_row(index))
        elif self.image_dir is not None:
            sample["image"] = self._load(index, image_id, sample)
        if self.tokenizer is not None:
            sample["caption_ids"] = caption_token_ids(self.tokenizer, self._captions[index], self.max_caption_length)
        if self._labels is not None:
            labels = self._labels[index]
            sample["targets"] = torch.from_numpy(self.codec.encode(labels))
            sample["label_seq"] = self.codec.sequence(labels) + [self.codec.end_index]
        return sample

    def source_row(self, index: int) -> int:
        """The row of the annotation file a sample came from: the ``_row`` column when the frame was split from a
        larger one (0-based data rows of the CSV), else the sample's position."""
        return self._rows[index] if self._rows is not None else index

    def _load(self, index: int, image_id: str, sample: dict[str, Any]) -> torch.Tensor:
        path = self.image_path(index)
        try:
            if self.image_cache is not None:
                return self.transform(self.image_cache.image(image_id))
            image = load_image(path, self.draft_size)
        except ImageLoadError as err:
            self._unreadable(index, image_id, err.reason, sample, err)
            return self._blank_image()
        return self.transform(image)

    def _read_file(self, index: int, image_id: str, sample: dict[str, Any]) -> Optional[bytes]:
        try:
            return self.image_path(index).read_bytes()
        except OSError as err:
            reason = "file not found" if isinstance(err, FileNotFoundError) else f"cannot read file ({err})"
            self._unreadable(index, image_id, reason, sample, err)
            return None

    def _unreadable(self, index: int, image_id: str, reason: str, sample: dict[str, Any],
                    cause: BaseException) -> None:
        """Raise the error naming the file, its row and ImageID; with ``skip_bad_images`` log it and flag the sample
        instead."""
        error = row_error(self.image_path(index), self.source_row(index), image_id, reason)
        if not self.skip_bad_images:
            raise error from cause
        logger.warning("skipping unreadable image: %s", error)
        sample["image_ok"], sample["error"] = False, str(error)

    def _blank_image(self) -> torch.Tensor:
        """Zeros shaped like the transform's output (found once by transforming a grey image)."""
        if self._blank is None and self.image_cache is not None:
            size = self.image_cache.size
            self._blank = torch.zeros_like(self.transform(torch.zeros(size, size, 3, dtype=torch.uint8)))
        if self._blank is None:
            self._blank = torch.zeros_like(self.transform(Image.new("RGB", (256, 256), (128, 128, 128))))
        return self._blank.clone()

    def check_images(self, strict: bool = True, decode: bool = False, workers: int = 0,
                     progress: bool = False) -> list[tuple[int, str, Path, str]]:
        """Find the images a run would stop on, up front, so it fails at once and names all of them, not after hours
        at the first one the loader reaches.

        Args:
            strict: raise if any image is bad.
            decode: also decode every image, at the JPEG decoder's smallest scale (1/8: a truncated or corrupt file
                fails as it does at full size, for a fraction of the cost), instead of only checking that each file
                exists.
            workers: threads that decode (Pillow releases the GIL while it decodes); 0 or 1: one.
            progress: show a progress bar while decoding.

        Returns:
            ``(row, ImageID, path, reason)`` of every bad image (empty for a dataset without images); ``row`` is the
            0-based data row of the annotation file, as `source_row` gives it.

        Raises:
            ImageLoadError: listing the first bad images with their rows, when ``strict``.
        """
        if self.image_dir is None:
            return []
        rows = [(self.source_row(row), image_id, self.image_dir / image_id)
                for row, image_id in enumerate(self.frame["ImageID"])]
        if decode:
            paths = [path for _, _, path in rows]
            chunks = [paths[i:i + CHECK_CHUNK] for i in range(0, len(paths), CHECK_CHUNK)]  # few futures at a time
            reasons = []
            with ThreadPoolExecutor(max(1, workers)) as pool, \
                    tqdm(total=len(paths), desc="checking images", disable=not progress, leave=False,
                         dynamic_ncols=True) as bar:
                for done in pool.map(_unreadable_reasons, chunks):
                    reasons.extend(done)
                    bar.update(len(done))
        else:
            reasons = [None if path.is_file() else "file not found" for _, _, path in rows]
        bad = [(row, image_id, path, reason) for (row, image_id, path), reason in zip(rows, reasons) if reason]
        if bad and strict:
            raise unreadable_images_error(self.image_dir, bad)
        return bad


def unreadable_images_error(image_dir: Path, bad: Sequence[tuple[int, str, Path, str]],
                            advice: Optional[str] = None) -> ImageLoadError:
    """The error for the bad images `ImageCaptionDataset.check_images` found: how many, the first ten by row, and
    ``advice`` (by default: fix or remove the rows, or pass --skip-bad-images)."""
    listed = "; ".join(f"{row_name(row, image_id)}: {path}: {reason}" for row, image_id, path, reason in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    missing = sum(reason == "file not found" for *_, reason in bad)
    what = (f"{len(bad)} image file(s) missing" if missing == len(bad) else
            f"{len(bad)} image(s) cannot be decoded" if not missing else
            f"{len(bad)} image(s) unreadable ({missing} missing, {len(bad) - missing} cannot be decoded)")
    advice = advice or "fix or remove those rows, or pass --skip-bad-images to skip them"
    return ImageLoadError(image_dir, f"{what}: {listed}{more} ({advice})")


def _unreadable_reasons(paths: Sequence[Path]) -> list[Optional[str]]:
    """Why each image file cannot be used (as `load_image` says it), or None: decoded at the smallest scale."""
    reasons: list[Optional[str]] = []
    for path in paths:
        try:
            load_image(path, draft_size=1)
            reasons.append(None)
        except ImageLoadError as err:
            reasons.append(err.reason)
    return reasons


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
            stacked = getattr(samples, "images", None)  # `SampleBatch`: already stacked, no second copy
            # default_collate stacks into shared memory in a worker (no copy on the way to the main process)
            batch["image"] = stacked if stacked is not None else default_collate([s["image"] for s in samples])
        if "image_file" in first:  # bytes (and None for unreadable files): device placement leaves them alone
            batch["image_files"] = [s["image_file"] for s in samples]
            batch["image_sources"] = [s["image_source"] for s in samples]
        if "image_features" in first:
            batch["image_features"] = torch.stack([s["image_features"] for s in samples])  # [B, F]
        batch["image_ok"] = torch.tensor([s["image_ok"] for s in samples], dtype=torch.bool)
        # The same as a host-side bool: a device placement moves the tensor, and reading it back would make the host
        # wait for the GPU on every batch.
        batch["all_images_ok"] = all(s["image_ok"] for s in samples)
        batch["error"] = [s.get("error") for s in samples]
        if "caption_ids" in first:
            ids, lengths = pad_token_ids([s["caption_ids"] for s in samples], self.pad_id)
            batch["caption_ids"], batch["caption_lengths"] = ids, lengths
            # A host-side copy that device placement leaves alone (a list): packing the LSTM's input needs the
            # lengths on the CPU, and reading them back from a GPU would make the host wait for the device.
            batch["caption_lengths_host"] = lengths.tolist()
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


def decode_images(batch: dict[str, Any], decoder: EncodedImageDecoder, skip_bad_images: bool = False,
                  transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, Any]:
    """A batch of `ImageCaptionDataset(encoded_images=True)` with its image files decoded by ``decoder``: ``image``
    uint8 [B, S, S, 3] on the decoder's device (as the image cache would hold them, for
    `images.BatchImageTransform`), or ``transform`` of that, and ``image_ok``/``all_images_ok``/``error`` updated for
    files that could not be decoded.

    Raises:
        ImageLoadError: naming the file, its row and ImageID, for the first file that cannot be decoded, unless
            ``skip_bad_images`` (its image is then zeros and flagged, as with the other loaders).
    """
    batch = dict(batch)
    files, sources = batch.pop("image_files"), batch.pop("image_sources")
    images, reasons = decoder(files)
    errors = list(batch.get("error") or [None] * len(files))
    for i, reason in enumerate(reasons):
        if reason is None:
            continue
        error = row_error(*sources[i], batch["image_id"][i], reason)
        if not skip_bad_images:
            raise error
        logger.warning("skipping unreadable image: %s", error)
        errors[i] = str(error)
    ok = [e is None for e in errors]
    batch.update(image=images if transform is None else transform(images), all_images_ok=all(ok), error=errors,
                 image_ok=torch.tensor(ok, dtype=torch.bool).to(images.device, non_blocking=True))
    return batch


def bounded_heap_worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` that keeps a worker's memory flat: glibc's mmap threshold fixed at 4 MiB.

    By default glibc raises that threshold each time a large block is freed, after which batch-sized blocks come
    from the heap and fragment it. Measured (benchmarks/SPEED.md, 224 px, batch 32): a worker's private memory grew
    by about 300 MB over the first 2000 images before levelling off; with the threshold fixed, blocks of 4 MiB and
    more (collated batches) are mapped and unmapped again and the workers stay flat, while the per-image tensors stay
    on the heap, so loading is as fast. A no-op where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD


class ImageCache:
    """Images decoded once, resized (short side) and centre-cropped, or squashed, to ``size`` x ``size``: a uint8
    [N, S, S, 3] ``.npy`` file read through a memory map, with a JSON sidecar (image ids, readable flags,
    fingerprint, build time).

    Reading a cached image is a copy of S * S * 3 bytes, against a JPEG decode and a bicubic resize, so the data
    loader stops being the bottleneck of a fast GPU. Build it with `build_image_cache`. Built at
    `images.eval_resize_size` it reproduces the evaluation transform exactly (`images.BatchImageTransform`); training
    crops then come from the centre square of each image.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = json.loads(self.path.with_suffix(".json").read_text())
        self.size: int = int(self.meta["size"])
        self.interpolation: str = self.meta["interpolation"]
        self.ids: list[str] = list(self.meta["ids"])
        self.ok = np.asarray(self.meta["ok"], dtype=bool)
        self.errors: dict[str, str] = dict(self.meta.get("errors", {}))
        self.row = {image_id: i for i, image_id in enumerate(self.ids)}
        self._array: Optional[np.ndarray] = None  # opened lazily, so each DataLoader worker maps it itself

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")  # [N, S, S, 3] uint8
        return self._array

    def __getstate__(self) -> dict[str, Any]:  # workers re-open the memory map instead of pickling it
        return {**self.__dict__, "_array": None}

    def image(self, image_id: str) -> torch.Tensor:
        """The cached uint8 image [S, S, 3] (a copy).

        Raises:
            ImageLoadError: the image is not in the cache or could not be read when the cache was built.
        """
        row = self.row.get(image_id)
        if row is None:
            raise ImageLoadError(image_id, f"not in the image cache {self.path}")
        if not self.ok[row]:
            raise ImageLoadError(image_id, self.errors.get(image_id, "unreadable when the image cache was built"))
        return torch.from_numpy(np.array(self.array[row]))

    def images(self, image_ids: Sequence[str]) -> Optional[torch.Tensor]:
        """The cached uint8 images [B, S, S, 3] of a batch, read in one copy; None if any of them is not in the cache
        or was unreadable (`image` then says which, and why)."""
        rows = [self.row.get(image_id) for image_id in image_ids]
        if any(row is None or not self.ok[row] for row in rows):
            return None
        out = batch_buffer((len(rows), *self.array.shape[1:]), torch.uint8)
        np.take(self.array, rows, axis=0, out=out.numpy(), mode="clip")  # "clip": unbuffered (the rows are valid)
        return out


def image_cache_fingerprint(image_ids: Sequence[str], image_dir: str | Path, size: int, interpolation: str,
                            crop: Optional[int] = None, squash: bool = False) -> str:
    """SHA-256 of the cache's parameters and of the image files' names and contents."""
    h = hashlib.sha256(f"{size}\0{interpolation}\0{crop}\n".encode() + (b"squash\n" if squash else b""))
    update_files_digest(h, image_ids, image_dir)
    return h.hexdigest()


class _CacheWriter(Dataset):
    """Decodes, resizes and writes one image into the cache file; run by DataLoader workers in parallel."""

    def __init__(self, image_ids: Sequence[str], image_dir: Path, path: Path, size: int, interpolation: str,
                 crop: Optional[int], squash: bool) -> None:
        self.image_ids, self.image_dir, self.path = list(image_ids), image_dir, path
        self.size, self.interpolation, self.crop, self.squash = size, interpolation, crop, squash
        self._array: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[int, Optional[str]]:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r+")
        try:
            image = load_image(self.image_dir / self.image_ids[index])
        except ImageLoadError as err:
            return index, err.reason
        self._array[index] = resize_for_cache(image, self.size, self.interpolation, self.crop, self.squash)
        return index, None


def build_image_cache(image_ids: Sequence[str], image_dir: str | Path, cache_dir: str | Path, size: int,
                      interpolation: str = "bicubic", crop: Optional[int] = None, squash: bool = False,
                      workers: int = 0, skip_bad_images: bool = False, rebuild: bool = False,
                      retry_unreadable: bool = True) -> ImageCache:
    """The `ImageCache` of these images at ``size``, reused from ``cache_dir`` when its fingerprint matches.

    The file is named by a fingerprint of the size, the interpolation, the crop mode and the image files (names and
    contents, `images.update_files_digest`), so a stale cache is never read; it is written under a temporary name and
    renamed when complete. The returned cache's ``meta`` holds ``build_seconds`` (of the build that wrote it) and
    ``reused``.

    Args:
        image_ids: file names, in dataset order (duplicates are stored once).
        image_dir: folder holding them.
        cache_dir: where the cache lives.
        size: side of the cached squares, e.g. `images.eval_resize_size` of the model's transform (256 for 224 px).
        interpolation: resize filter, the encoder's (``resolve_image_config(...)["interpolation"]``).
        crop: the model's input size: aligns each square so that its centre crop of this size is exactly the
            evaluation transform's crop (see `images.resize_for_cache`).
        squash: resize whole images to ``size`` x ``size`` (the evaluation transform of ``crop="full"`` models).
            `images.image_cache_settings` gives ``size``, ``interpolation``, ``crop`` and ``squash`` for a model.
        workers: decoding processes (DataLoader workers); 0 decodes in this process.
        skip_bad_images: record unreadable images as such instead of raising.
        rebuild: build even when a matching cache exists.
        retry_unreadable: try again, in a reused cache, the images it marks unreadable, and add those that read now
            (off on all processes but the one that builds the cache: they take it as it is).

    Raises:
        ImageLoadError: an image is missing or unreadable and ``skip_bad_images`` is off; the message names the file,
            its ImageID and its position in ``image_ids`` (the data row when they are a frame's column).
    """
    first_row: dict[str, int] = {}
    for row, image_id in enumerate(image_ids):
        first_row.setdefault(image_id, row)
    image_ids = list(first_row)  # duplicates stored once
    image_dir = Path(image_dir)
    fingerprint = image_cache_fingerprint(image_ids, image_dir, size, interpolation, crop, squash)
    path = Path(cache_dir) / f"images-{size}-{interpolation}{'-squash' if squash else ''}-{fingerprint[:20]}.npy"
    if path.is_file() and path.with_suffix(".json").is_file() and not rebuild:
        cache, problem = _reusable_image_cache(path, fingerprint, image_ids, size)
        if cache is not None:
            cache.meta["reused"] = True
            logger.info("image cache: reused %s (%d images at %d px)", path, len(cache), size)
            if retry_unreadable and not cache.ok.all():
                cache = _retry_unreadable(cache, image_dir, size, interpolation, crop, squash)
            return cache
        logger.warning("image cache: %s %s: building it again", path, problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(path.parent):
        logger.info("image cache: removed %s, left by a build that was stopped", stale)
    start = time.perf_counter()
    errors: dict[str, str] = {}
    # This build's own file (another process may be building the same cache; the same images, so the same contents,
    # whichever publishes last); an unreadable image, Ctrl-C or a worker that died leaves no partial file behind.
    with published(path, ".npy") as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(image_ids), size, size, 3)).flush()
        loader = torch.utils.data.DataLoader(
            _CacheWriter(image_ids, image_dir, tmp, size, interpolation, crop, squash), batch_size=32,
            num_workers=workers, collate_fn=list, worker_init_fn=bounded_heap_worker_init,
            # its own generator: building the cache must not move the global RNG, or a run that builds it would
            # train differently from one that reuses it
            generator=torch.Generator())
        for batch in loader:
            for index, error in batch:
                if error is not None:
                    if not skip_bad_images:
                        image_id = image_ids[index]
                        raise row_error(image_dir / image_id, first_row[image_id], image_id, error)
                    errors[image_ids[index]] = error
    build_seconds = time.perf_counter() - start
    # Written after the array: a cache is read only where both are (a kill between them leaves it to be rebuilt).
    save_json({"size": size, "interpolation": interpolation, "crop": crop, "squash": squash,
               "fingerprint": fingerprint, "image_dir": str(image_dir), "build_seconds": build_seconds,
               "workers": workers, "ids": image_ids, "ok": [image_id not in errors for image_id in image_ids],
               "errors": errors}, path.with_suffix(".json"))
    cache = ImageCache(path)
    cache.meta["reused"] = False
    logger.info("image cache: %d images at %d px built in %.1f s -> %s", len(image_ids), size, build_seconds, path)
    return cache


def _reusable_image_cache(path: Path, fingerprint: str, image_ids: list[str], size: int
                          ) -> tuple[Optional[ImageCache], str]:
    """The cache at ``path`` if it holds what its name promises (the fingerprint, these images at ``size``); else
    None and what is wrong."""
    try:
        cache = ImageCache(path)
        shape = cache.array.shape
        if cache.meta.get("fingerprint") != fingerprint or cache.ids != image_ids \
                or cache.ok.shape != (len(image_ids),):
            return None, "does not hold the images its name promises"
    except (OSError, ValueError, KeyError, TypeError) as error:  # a file cut short, a damaged sidecar
        return None, f"is unreadable ({type(error).__name__}: {error})"
    if shape != (len(image_ids), size, size, 3):
        return None, f"holds an array of shape {shape}, not {(len(image_ids), size, size, 3)}"
    return cache, ""


def _retry_unreadable(cache: ImageCache, image_dir: Path, size: int, interpolation: str, crop: Optional[int],
                      squash: bool) -> ImageCache:
    """The images that ``cache`` marks unreadable, tried again (an error outside the file when it was built: the
    same bytes, the same key); those that read now are written into their rows in place, then marked readable in the
    sidecar (published whole). A reader of the cache meanwhile takes those rows as unreadable, as before, and every
    other row is untouched."""
    fixed: list[int] = []
    try:
        array = np.load(cache.path, mmap_mode="r+")
        for row in np.flatnonzero(~cache.ok).tolist():
            try:
                image = load_image(image_dir / cache.ids[row])
            except ImageLoadError:
                continue
            array[row] = resize_for_cache(image, size, interpolation, crop, squash)
            fixed.append(row)
        if not fixed:
            return cache
        array.flush()
        del array
        fsync(cache.path)
        ok, added = cache.ok.copy(), {cache.ids[r] for r in fixed}
        ok[fixed] = True
        meta = {k: v for k, v in cache.meta.items() if k != "reused"}
        save_json(meta | {"ok": ok.tolist(), "errors": {i: e for i, e in cache.errors.items() if i not in added}},
                  cache.path.with_suffix(".json"))
    except OSError as error:  # a cache folder that is read-only here: the images stay skipped
        logger.warning("image cache: could not add %d image(s) that read now to %s (%s)", len(fixed),
                       cache.path, error)
        return cache
    logger.info("image cache: %d image(s) unreadable when %s was built read now: added", len(fixed), cache.path)
    updated = ImageCache(cache.path)
    updated.meta["reused"] = True
    return updated


def build_model_image_cache(config: Any, image_ids: Sequence[str], image_dir: str | Path, cache_dir: str | Path, *,
                            workers: int = 0, skip_bad_images: bool = False,
                            retry_unreadable: bool = True) -> ImageCache:
    """`build_image_cache` with the settings under which it reproduces the evaluation transform of a model's image
    branch: `images.image_cache_settings` of the `config.ModelConfig`'s encoder, resolution and crop mode."""
    settings = image_cache_settings(config.image_encoder, config.image_size, config.image_crop)
    return build_image_cache(image_ids, image_dir, cache_dir, **settings, workers=workers,
                             skip_bad_images=skip_bad_images, retry_unreadable=retry_unreadable)


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
        raise UsageError(f"a validation fraction of {val_fraction} leaves no training rows out of {n}: give more rows "
                         "(--limit) or a smaller --val-fraction")
    permutation = np.random.default_rng(seed).permutation(n)
    val_rows, train_rows = np.sort(permutation[:n_val]), np.sort(permutation[n_val:])
    return frame.iloc[train_rows].reset_index(drop=True), frame.iloc[val_rows].reset_index(drop=True)


def subsample_rows(frame: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """A reproducible random share of the rows (at least one), in file order: for learning curves, the training part
    shrinks while the validation split stays the same.

    Args:
        frame: annotation frame (usually the training part of `train_val_split`).
        fraction: share of rows kept, in (0, 1]; 1 returns ``frame`` itself.
        seed: seed of the draw (independent of the split's permutation with the same seed).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the training fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return frame
    n = max(1, int(round(len(frame) * fraction)))
    keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(frame))[:n])
    return frame.iloc[keep].reset_index(drop=True)
