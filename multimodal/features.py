"""Pooled image features computed once and cached, for training on top of a frozen image encoder.

On a CPU the image encoder is most of the cost; when it is frozen its output for an image never changes, so the
features are computed once (eval transform: resize + centre crop) and every epoch reads them from memory. The cache
file is named by a fingerprint of everything the features depend on: the encoder and the hash of its weights, the
preprocessing (resolution, mean/std, crop), the image files (names and contents) and the code and libraries that
decode them and run the encoder (`images.decoding_key`, torch, timm). Changing any of them gives a new fingerprint, so
a stale cache is never read; a copied dataset (same bytes, new file times) keeps its cache. A cache file that cannot
be read or does not hold what its name promises (a copy cut short, a damaged disk) is computed again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import published, remove_stale_temporaries
from .data import Collator, ImageCaptionDataset, row_error
from .images import build_transform, is_readable, update_files_digest
from .model import ImageEncoder

logger = logging.getLogger("multimodal")


def weights_digest(*modules: torch.nn.Module) -> str:
    """SHA-256 of the modules' states (names, shapes and values)."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            h.update((name if len(modules) == 1 else f"{i}.{name}").encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def images_digest(frame: pd.DataFrame, image_dir: str | Path) -> str:
    """SHA-256 of the image files' names and contents, in row order (`images.update_files_digest`)."""
    h = hashlib.sha256()
    update_files_digest(h, frame["ImageID"], image_dir)
    return h.hexdigest()


def feature_fingerprint(encoder: ImageEncoder, image_size: int, frame: pd.DataFrame, image_dir: str | Path,
                        tail_stages: Optional[int] = None, crop: str = "center") -> str:
    """What the features depend on: with ``tail_stages``, the weights below the tail only (those the maps are
    computed with; the tail is trained, and a resumed run's tail differs from the pretrained one)."""
    transform = build_transform(encoder, image_size, training=False, crop=crop)
    weights = weights_digest(encoder) if tail_stages is None else weights_digest(*encoder.stem_modules(tail_stages))
    parts = {"encoder": encoder.name, "weights": weights, "image_size": image_size,
             "transform": repr(transform), "images": images_digest(frame, image_dir),
             "libraries": f"torch {torch.__version__}; timm {timm.__version__}"}
    if tail_stages is not None:
        parts["tail_stages"] = tail_stages
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@torch.no_grad()  # not inference_mode: the features feed layers that are trained (--train-tail-stages)
def compute_features(encoder: ImageEncoder, dataset: Dataset, batch_size: int = 64, workers: int = 2,
                     device: str | torch.device = "cpu", channels_last: bool = True,
                     progress: bool = True, tail_stages: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image of ``dataset`` in order, or with ``tail_stages`` the feature maps below the
    encoder's last ``tail_stages`` stages (float16, to halve the memory).

    It runs a copy of ``encoder``: the caller's keeps its mode, device and memory layout (channels-last here, which a
    run with ``--no-channels-last`` would otherwise have trained in, on the process that computed the features only).

    Returns:
        ``features`` [N, F] float32 or [N, C, h, w] float16 (zeros where an image could not be read) and ``ok``
        bool [N].
    """
    encoder = copy.deepcopy(encoder).eval().to(device)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=Collator(), generator=torch.Generator())  # leaves the global RNG where it was
    features: Optional[torch.Tensor] = None
    ok = torch.ones(len(dataset), dtype=torch.bool)
    for batch in tqdm(loader, desc="image features", disable=not progress, leave=False):
        image = batch["image"].to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        if tail_stages is None:
            out = encoder(image).float().cpu()  # [B, F]
        else:
            out = encoder.forward_stem(image, tail_stages).half().cpu().contiguous()  # [B, C, h, w]
        if features is None:
            features = torch.zeros((len(dataset), *out.shape[1:]), dtype=out.dtype)
        features[batch["index"]] = out
        ok[batch["index"]] = batch["image_ok"]
    features[~ok] = 0
    return features, ok


def cached_features(encoder: ImageEncoder, frame: pd.DataFrame, image_dir: str | Path, image_size: int,
                    cache_dir: str | Path, *, batch_size: int = 64, workers: int = 2,
                    device: str | torch.device = "cpu", skip_bad_images: bool = False,
                    tail_stages: Optional[int] = None, crop: str = "center",
                    retry_unreadable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_features` for the rows of ``frame``, read from ``cache_dir`` when a matching cache exists; ``crop``
    is the evaluation transform's crop mode (`config.IMAGE_CROPS`). With ``retry_unreadable`` (off on all processes
    but the one that builds the cache: they take it as it is), the images a cache marks unreadable are tried again
    (an error outside the file when it was built, such as a network drive's: the same bytes, the same key), and the
    features of those that read now are added to it.

    Returns:
        ``features`` ([N, F], or [N, C, h, w] with ``tail_stages``) aligned with the rows of ``frame``, ``ok`` [N].

    Raises:
        ImageLoadError: an image is unreadable and ``skip_bad_images`` is off; also when the cache that matches was
            built by a run that skipped unreadable images (it names the first, with its row).
    """
    fingerprint = feature_fingerprint(encoder, image_size, frame, image_dir, tail_stages, crop)
    kind = ("" if tail_stages is None else f"-below{tail_stages}") + ("" if crop == "center" else f"-{crop}")
    path = Path(cache_dir) / f"features-{encoder.name}-{image_size}{kind}-{fingerprint[:20]}.safetensors"

    def dataset(rows: Any = slice(None), skip: bool = skip_bad_images) -> ImageCaptionDataset:
        columns = [c for c in ("ImageID", "Caption", "_row") if c in frame.columns]  # _row: errors name the row
        return ImageCaptionDataset(frame[columns].iloc[rows].reset_index(drop=True), image_dir,
                                   transform=build_transform(encoder, image_size, training=False, crop=crop),
                                   skip_bad_images=skip)

    cached = read_cache(path, fingerprint, len(frame), tail_stages) if path.is_file() else None
    if cached is not None:
        logger.info("image features: cache hit %s", path)
        features, ok = cached
        readable = [i for i in (~ok).nonzero().flatten().tolist()
                    if is_readable(Path(image_dir) / frame["ImageID"].iloc[i])] if retry_unreadable else []
        if readable:
            logger.info("image features: %d image(s) unreadable when the cache was built read now: computing them",
                        len(readable))
            # (skipping: one that fails again stays marked, and is reported below with its row)
            more, more_ok = compute_features(encoder, dataset(readable, skip=True), batch_size, workers, device,
                                             progress=False, tail_stages=tail_stages)
            features[readable], ok[readable] = more, more_ok
            if more_ok.any():
                _write_cache(path, features, ok, fingerprint)
        if not skip_bad_images and not ok.all():
            bad = int((~ok).sum())
            first = int((~ok).nonzero()[0])
            image_id = frame["ImageID"].iloc[first]
            row = int(frame["_row"].iloc[first]) if "_row" in frame else first
            raise row_error(Path(image_dir) / image_id, row, image_id,
                            f"unreadable when the feature cache {path} was built ({bad} image(s) in all, skipped "
                            "there with --skip-bad-images), and still unreadable: fix them, or skip them here too")
        return features, ok
    logger.info("image features: computing %d x %s at %d px (cache %s)", len(frame), encoder.name, image_size, path)
    features, ok = compute_features(encoder, dataset(), batch_size, workers, device, tail_stages=tail_stages)
    _write_cache(path, features, ok, fingerprint)
    return features, ok


def read_cache(path: Path, fingerprint: str, rows: int, tail_stages: Optional[int] = None
               ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The ``features`` and ``ok`` of a cache file, or None (with a warning) when the file cannot be read or does not
    hold what its name promises: its fingerprint, ``rows`` rows, pooled float32 features or float16 maps."""
    try:
        with safe_open(str(path), "pt") as f:  # one reading of the file: its metadata and its tensors
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        features, ok = tensors.get("features"), tensors.get("ok")
        ndim, dtype = (2, torch.float32) if tail_stages is None else (4, torch.float16)
        if meta.get("fingerprint") != fingerprint:
            problem = "its fingerprint is not the one its name starts with"
        elif features is None or ok is None:
            problem = f"it holds {sorted(tensors)}, not features and ok"
        elif features.ndim != ndim or features.dtype != dtype:
            problem = f"its features are {features.dtype} {list(features.shape)}, not {ndim}-d {dtype}"
        elif len(features) != rows or ok.shape != (rows,):
            problem = f"it has {len(features)} rows, not {rows}"
        else:
            return features, ok.bool()
    logger.warning("image features: the cache %s is %s: computing the features again", path,
                   problem if problem.startswith("unreadable") else f"not usable ({problem})")
    return None


def _write_cache(path: Path, features: torch.Tensor, ok: torch.Tensor, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(path.parent):
        logger.info("image features: removed %s, left by a run that was stopped", stale)
    with published(path) as tmp:  # this process's own file: another run may be computing the same features
        save_file({"features": features.contiguous(), "ok": ok.to(torch.uint8)}, str(tmp),
                  metadata={"fingerprint": fingerprint, "rows": str(len(features))})


class FeatureDataset(Dataset):
    """An `ImageCaptionDataset` without images whose samples carry cached ``image_features`` instead.

    Args:
        dataset: the image-less dataset (captions, labels).
        features: [N_all, F] features or [N_all, C, h, w] feature maps; ``rows[i]`` is the row of sample ``i``.
        ok: [N_all] whether each image could be read.
        rows: per sample of ``dataset``, its row in ``features``.
        flip: mirror a feature map left-right with probability 1/2 (training augmentation; a map of a mirrored
            image is close to the mirrored map, since the network is trained on flipped images).
    """

    def __init__(self, dataset: ImageCaptionDataset, features: torch.Tensor, ok: torch.Tensor,
                 rows: Any, flip: bool = False) -> None:
        self.dataset = dataset
        self.flip = flip and features.ndim == 4
        self.features = features
        self.ok = ok
        self.rows = torch.as_tensor(list(rows), dtype=torch.long)
        if len(self.rows) != len(dataset):
            raise ValueError(f"{len(self.rows)} feature rows for {len(dataset)} samples")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        row = int(self.rows[index])
        feature = self.features[row]
        if self.flip and bool(torch.rand(()) < 0.5):
            feature = feature.flip(-1)  # [C, h, W]: mirror the width
        sample["image_features"] = feature
        sample["image_ok"] = bool(self.ok[row])
        return sample
