"""Batch inference: an exported model over a CSV or a folder of images, streamed to CSV files.

Rows are written batch by batch as they are predicted, so memory stays flat however many images there are.
"""
from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .annotations import read_annotations
from .data import Collator, ImageCaptionDataset, bounded_heap_worker_init
from .engine import model_inputs
from .images import BatchImageTransform, build_transform, draft_size_for
from .metrics import binarize
from .model import MultimodalClassifier
from .text import PAD_ID

logger = logging.getLogger("multimodal")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def folder_frame(image_dir: str | Path) -> pd.DataFrame:
    """Every image in a folder (sorted by name), with empty captions, for prediction without a CSV."""
    files = sorted(p.name for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return pd.DataFrame({"ImageID": files, "Caption": [""] * len(files)})


def resolve_inputs(data_dir: Optional[str], csv_path: Optional[str],
                   image_dir: Optional[str]) -> tuple[pd.DataFrame, Optional[Path], bool]:
    """The rows to predict, their image folder, and whether captions came with them.

    ``--csv`` defaults to ``DATA_DIR/test.csv`` when that exists, else every image of the image folder is predicted
    (``--image-dir``, default ``DATA_DIR/data`` or ``DATA_DIR`` itself).
    """
    base = Path(data_dir) if data_dir else None
    images = Path(image_dir) if image_dir else None
    if images is None and base is not None:
        images = base / "data" if (base / "data").is_dir() else base
    csv_file = Path(csv_path) if csv_path else None
    if csv_file is None and base is not None and (base / "test.csv").is_file():
        csv_file = base / "test.csv"
    if csv_file is not None:
        return read_annotations(csv_file), images, True
    if images is None:
        raise ValueError("nothing to predict: give --data-dir, --csv or --image-dir")
    return folder_frame(images), images, False


def iter_predictions(model: MultimodalClassifier, loader: DataLoader, accelerator: Any,
                     ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]]:
    """(image ids, [B, C] probabilities, [B] usable, (ImageID, error) of unreadable images) per batch.

    A row whose image could not be read (``skip_bad_images``) is predicted from its caption alone when the model has
    a caption branch; otherwise it is marked unusable and gets no labels.
    """
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            inputs = model_inputs(batch)
            with accelerator.autocast():
                probs = model.predict_proba(**inputs).float()
                usable = torch.ones(len(probs), dtype=torch.bool, device=probs.device)
                if "image_ok" in batch and model.image_encoder is not None and not bool(batch["image_ok"].all()):
                    bad = ~batch["image_ok"]
                    if model.caption_encoder is not None:
                        embedding = model.caption_encoder(batch["caption_ids"][bad], batch["caption_lengths"][bad])
                        probs[bad] = torch.sigmoid(model.caption_head(embedding).float())
                    else:
                        usable &= ~bad
            errors = [(i, e) for i, e in zip(batch["image_id"], batch["error"]) if e is not None]
            yield list(batch["image_id"]), probs.cpu().numpy(), usable.cpu().numpy(), errors


def predict_to_csv(model: MultimodalClassifier, frame: pd.DataFrame, image_dir: Optional[Path], output: str | Path,
                   accelerator: Any, *, thresholds: Any = None, probabilities: Optional[str | Path] = None,
                   batch_size: int = 64, workers: int = 2, skip_bad_images: bool = False,
                   draft_size: Optional[int] | str = "auto", image_cache: Any = None,
                   channels_last: bool = True) -> dict[str, Any]:
    """Predict every row of ``frame`` in order and write ``ImageID,Labels`` (original ids, space-separated).

    Speed options: ``draft_size`` (``"auto"``: `images.draft_size_for` the model's evaluation transform, so JPEGs at
    least twice the needed size are decoded at 1/2..1/8 scale; ``None``: full-size decoding) and ``image_cache``
    (a `data.ImageCache` built at the evaluation resize size: images are read from it as uint8 and preprocessed by
    `images.BatchImageTransform`, batched on a GPU, per image in the DataLoader workers on a CPU), and
    ``channels_last`` (the image encoder and its input in channels-last memory format, on CPU and GPU alike; the model
    is converted in place; see benchmarks/SPEED.md for the measured gains).

    Returns:
        ``rows`` written and ``bad_images`` (ImageID, error) pairs of images that could not be read.
    """
    codec = model.codec
    thresholds = model.thresholds if thresholds is None else thresholds
    thresholds = 0.5 if thresholds is None else thresholds
    use_image = model.image_encoder is not None
    crop = model.config.image_crop
    transform = build_transform(model.config.image_encoder, model.config.image_size, False,
                                crop=crop) if use_image else None
    if draft_size == "auto":
        draft_size = draft_size_for(model.config.image_encoder, model.config.image_size, crop=crop) \
            if use_image else None
    cache = image_cache if use_image else None
    on_device = cache is not None and accelerator.device.type == "cuda"
    channels_last = channels_last and use_image
    if channels_last:
        model.image_encoder.to(memory_format=torch.channels_last)
    if cache is not None:  # uint8 from the cache: preprocessed on the GPU, or by the workers on a CPU
        transform = BatchImageTransform(model.image_encoder, model.config.image_size, training=False,
                                        channels_last=on_device)
    dataset = ImageCaptionDataset(frame, image_dir if use_image else None, codec=None, tokenizer=model.tokenizer,
                                  transform=None if on_device else transform, skip_bad_images=skip_bad_images,
                                  draft_size=draft_size, image_cache=cache)
    if use_image and not skip_bad_images:
        dataset.check_images()  # a missing file stops the run now, naming it, not after hours of predictions
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=Collator(pad_id=PAD_ID), pin_memory=accelerator.device.type == "cuda",
                        persistent_workers=False, worker_init_fn=bounded_heap_worker_init)
    bad: list[tuple[str, str]] = []
    rows = 0
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_name(output.name + ".tmp")
    tmp_prob = Path(str(probabilities) + ".tmp") if probabilities else None
    try:
        with open(tmp_out, "w", newline="") as f_out, \
                (open(tmp_prob, "w", newline="") if tmp_prob else contextlib.nullcontext()) as f_p:
            out = csv.writer(f_out)
            out.writerow(["ImageID", "Labels"])
            prob_writer = csv.writer(f_p) if tmp_prob else None
            if prob_writer:
                prob_writer.writerow(["ImageID", *[str(i) for i in codec.label_ids]])
            device_transform = transform.to(accelerator.device) if on_device else None
            batches = _prepare_images(loader, accelerator.device, device_transform, channels_last) \
                if on_device or channels_last else loader
            for ids, probs, usable, errors in iter_predictions(model, batches, accelerator):
                bad.extend(errors)
                pred = binarize(probs, thresholds, at_least_one=True) & usable[:, None]
                for image_id, row in zip(ids, pred):
                    out.writerow([image_id, " ".join(str(codec.label_ids[c]) for c in np.flatnonzero(row))])
                if prob_writer:  # no probabilities (nan) for a row that could not be predicted at all
                    for image_id, p, ok in zip(ids, probs, usable):
                        prob_writer.writerow([image_id, *(f"{v:.6f}" if ok else "nan" for v in p)])
                rows += len(ids)
    except BaseException:  # no half-written output left behind
        tmp_out.unlink(missing_ok=True)
        if tmp_prob:
            tmp_prob.unlink(missing_ok=True)
        raise
    tmp_out.replace(output)
    if tmp_prob:
        tmp_prob.replace(probabilities)
    return {"rows": rows, "bad_images": bad}


def _prepare_images(loader: Any, device: torch.device, transform: Any = None,
                    channels_last: bool = False) -> Iterator[dict[str, Any]]:
    """Batches whose images are moved to ``device`` and there preprocessed (``transform``: cached uint8 images
    [B, S, S, 3] -> float [B, 3, s, s]) and/or made channels-last."""
    for batch in loader:
        if "image" in batch:
            image = batch["image"].to(device, non_blocking=True)
            image = transform(image) if transform is not None else image
            batch["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
        yield batch
