"""Batch inference: an exported model over a CSV or a folder of images, streamed to CSV files.

Rows are written batch by batch as they are predicted, so memory stays flat however many images there are.
"""
from __future__ import annotations

import contextlib
import csv
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .annotations import IMAGE_EXTENSIONS, AnnotationError, read_annotations
from .config import UsageError, published, remove_stale_temporaries
from .data import Collator, ImageCaptionDataset, bounded_heap_worker_init, decode_images, row_name
from .engine import all_images_ok, model_inputs
from .images import BatchImageTransform, EncodedImageDecoder, build_transform, draft_size_for
from .metrics import binarize, check_thresholds, compute_metrics, mean_thresholds
from .model import MultimodalClassifier
from .text import PAD_ID

logger = logging.getLogger("multimodal")

IMAGE_SUFFIXES = tuple(f".{extension}" for extension in IMAGE_EXTENSIONS)  # those an annotation file's ImageIDs take


def folder_frame(image_dir: str | Path) -> pd.DataFrame:
    """Every image in a folder and its subfolders (ImageIDs: paths relative to it, sorted), with empty captions, for
    prediction without a CSV."""
    root = Path(image_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   # not hidden files or folders (.ipynb_checkpoints), nor macOS's metadata (__MACOSX/._x.jpg)
                   and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return pd.DataFrame({"ImageID": files, "Caption": [""] * len(files)})


def resolve_inputs(data_dir: Optional[str], csv_path: Optional[str],
                   image_dir: Optional[str]) -> tuple[pd.DataFrame, Optional[Path], Optional[Path]]:
    """The rows to predict, their image folder, and the CSV they were read from (``None``: a folder without captions).

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
        return read_annotations(csv_file), images, csv_file
    if images is None:
        raise UsageError("nothing to predict: give --data-dir, --csv or --image-dir")
    return folder_frame(images), images, None


def shared_stem_stages(encoders: Sequence[Any]) -> Optional[int]:
    """How much of the image encoders an ensemble can run once for all its members: the fewest top stages ``k``
    such that everything below them (the stem convolution, its norm, every stage but the last ``k``) holds the same
    weights and buffers in every encoder, as in models fine-tuned from the same pretrained weights above a frozen
    bottom (`train.py --train-tail-stages`, `--cache-features`). None when not even the stem is shared or an
    encoder cannot be split (`model.ImageEncoder.forward_stem`)."""
    try:
        stages = [e._stages() for e in encoders]
    except TypeError:
        return None
    if any(type(e.backbone) is not type(encoders[0].backbone) or len(st) != len(stages[0])
           for e, st in zip(encoders, stages)):
        return None

    def same(modules: Sequence[torch.nn.Module]) -> bool:
        states = [m.state_dict() for m in modules]
        return all(a.keys() == states[0].keys() and all(torch.equal(a[k], states[0][k]) for k in a)
                   for a in states[1:])

    if not (same([e.backbone.conv_stem for e in encoders]) and same([e.backbone.bn1 for e in encoders])):
        return None
    for i in range(len(stages[0])):
        if not same([st[i] for st in stages]):
            return len(stages[0]) - i
    return 0


@contextlib.contextmanager
def _tail_stages(model: MultimodalClassifier, k: int) -> Iterator[None]:
    """``model`` takes feature maps below its last ``k`` stages as ``image_features`` for the duration."""
    before = model.tail_stages
    model.tail_stages = k
    try:
        yield
    finally:
        model.tail_stages = before


def iter_predictions(model: MultimodalClassifier | Sequence[MultimodalClassifier], loader: DataLoader,
                     accelerator: Any, stem_stages: Optional[int] = None,
                     ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]]:
    """(image ids, [M, B, C] probabilities, [M, B] usable, (ImageID, error) of unreadable images) per batch, for
    the M models given (one model or a list; M = 1 for one), all on the same batches.

    A row whose image could not be read (``skip_bad_images``) is predicted from its caption alone when the model has
    a caption branch; otherwise it is marked unusable and gets no labels.

    ``stem_stages`` = k (`shared_stem_stages` of the models' image encoders): the encoders' bottom, below their last
    k stages, is run once per batch (by the first model) and each model runs only its own top on that feature map.

    On a GPU a batch's results are handed over only once the next batch's forward pass is queued, and they come back
    by an asynchronous copy: what the caller does with them (thresholds, the CSV) runs while the GPU computes, instead
    of the GPU waiting for it.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    for m in models:
        m.eval()
    device = accelerator.device
    pending = None
    for batch in loader:
        # Inference mode for this batch's work only, never across a yield: it is a thread-wide switch, and the
        # generators of an ensemble's streams run interleaved, so a mode held over yields would be restored out of
        # order and could leave gradients off for the caller.
        with torch.inference_mode():
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            inputs = model_inputs(batch)
            all_ok = "image_ok" not in batch or all_images_ok(batch)
            probs, usable = [], []
            with accelerator.autocast():
                if stem_stages is not None and inputs.get("image") is not None:
                    inputs["image_features"] = models[0].image_encoder.forward_stem(inputs.pop("image"), stem_stages)
                for m in models:
                    # An unreadable image: predicted from the caption alone, or (no caption branch) unusable.
                    unreadable = not all_ok and m.image_encoder is not None
                    from_caption = unreadable and m.predicts_without_image
                    with _tail_stages(m, stem_stages or 0):
                        p = m.predict_proba(**inputs, image_ok=batch["image_ok"] if from_caption else None).float()
                    ok = torch.ones(len(p), dtype=torch.bool, device=p.device)
                    if unreadable and not from_caption:
                        ok &= batch["image_ok"]
                    probs.append(p)
                    usable.append(ok)
            errors = [(i, e) for i, e in zip(batch["image_id"], batch["error"]) if e is not None]
            copied = _to_host(torch.stack(probs), torch.stack(usable))
        if pending is not None:
            yield _host_result(*pending)
        pending = (list(batch["image_id"]), copied, errors)
    if pending is not None:
        yield _host_result(*pending)


def _to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], Optional[torch.cuda.Event]]:
    """Copies of ``tensors`` on the CPU, and from a GPU the event that marks them complete: the copies go into pinned
    memory without the host waiting for them."""
    if not tensors[0].is_cuda:
        return list(tensors), None
    copies = [t.to("cpu", non_blocking=True) for t in tensors]
    event = torch.cuda.Event()
    event.record()
    return copies, event


def _host_result(ids: list[str], copied: tuple[list[torch.Tensor], Optional[torch.cuda.Event]],
                 errors: list[tuple[str, str]]) -> tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]:
    (probs, usable), event = copied
    if event is not None:
        event.synchronize()  # this batch's copies only; the next batch keeps running on the GPU
    return ids, probs.numpy(), usable.numpy(), errors


def _preprocessing_key(model: MultimodalClassifier, cache: Any) -> tuple[Any, ...]:
    """Models with the same key read the same batches: image preprocessing, image cache and tokenizer alike."""
    image = (model.config.image_encoder, model.config.image_size, model.config.image_crop,
             None if cache is None else str(cache.path)) if model.image_encoder is not None else None
    caption = (model.tokenizer.to_str(), model.config.max_caption_length) if model.caption_encoder is not None else None
    return image, caption


def _group_batches(models: Sequence[MultimodalClassifier], frame: pd.DataFrame, image_dir: Optional[Path],
                   accelerator: Any, *, batch_size: int, workers: int, skip_bad_images: bool,
                   draft_size: Optional[int] | str, image_cache: Any, channels_last: bool,
                   decode_on_device: bool = False, share_stem: bool = True
                   ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]]:
    """`iter_predictions` over ``frame`` of models that share one preprocessing (`_preprocessing_key`), read by one
    loader with the first model's preprocessing (see `predict_to_csv`); with ``share_stem``, the image encoders'
    common bottom (`shared_stem_stages`) runs once per batch."""
    model = models[0]
    use_image = model.image_encoder is not None
    crop = model.config.image_crop
    transform = build_transform(model.config.image_encoder, model.config.image_size, False,
                                crop=crop) if use_image else None
    if draft_size == "auto":
        draft_size = draft_size_for(model.config.image_encoder, model.config.image_size, crop=crop) \
            if use_image else None
    cache = image_cache if use_image else None
    encoded = decode_on_device and use_image
    if encoded and cache is not None:
        raise ValueError("decode_on_device decodes the image files: it cannot be combined with an image cache")
    on_device = cache is not None and accelerator.device.type == "cuda" or encoded
    channels_last = channels_last and use_image
    if channels_last:
        for m in models:
            m.image_encoder.to(memory_format=torch.channels_last)
    # uint8 squares (from the cache, or decoded on the device): preprocessed on the device, or by the workers for a
    # cache on a CPU
    if cache is not None or encoded:
        transform = BatchImageTransform(model.image_encoder, model.config.image_size, training=False,
                                        channels_last=on_device)
    dataset = ImageCaptionDataset(frame, image_dir if use_image else None, codec=None, tokenizer=model.tokenizer,
                                  max_caption_length=model.config.max_caption_length,
                                  transform=None if on_device else transform, skip_bad_images=skip_bad_images,
                                  draft_size=draft_size, image_cache=cache, encoded_images=encoded)
    if use_image and not skip_bad_images:
        dataset.check_images()  # a missing file stops the run now, naming it, not after hours of predictions
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=Collator(pad_id=PAD_ID), pin_memory=accelerator.device.type == "cuda",
                        persistent_workers=False, worker_init_fn=bounded_heap_worker_init)
    device_transform = transform.to(accelerator.device) if on_device else None
    decoder = EncodedImageDecoder.for_model(model.image_encoder, model.config.image_size, crop,
                                            device=accelerator.device) if encoded else None
    batches = _prepare_images(loader, accelerator.device, device_transform, channels_last, decoder,
                              skip_bad_images) if on_device or channels_last else loader
    stem = shared_stem_stages([m.image_encoder for m in models]) \
        if share_stem and use_image and len(models) > 1 else None
    return iter_predictions(models, batches, accelerator, stem_stages=stem)


def _ensemble(streams: list[Iterator[tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]]]
              ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[tuple[str, str]]]]:
    """The streams' batches in lockstep (each holds [M, B, C] probabilities of its models): per row, the mean of the
    probabilities of the models that could predict it; a row is usable if any model could predict it; each
    unreadable image is reported once. One model's batches pass as they are."""
    for parts in zip(*streams, strict=True):
        ids = parts[0][0]
        if any(p[0] != ids for p in parts[1:]):
            raise RuntimeError("the models of an ensemble went out of step (different rows in one batch)")
        probs = np.concatenate([p[1] for p in parts])  # [M, B, C]
        usable = np.concatenate([p[2] for p in parts])  # [M, B]
        errors = list(dict.fromkeys(e for p in parts for e in p[3]))
        if len(probs) == 1:
            yield ids, probs[0], usable[0], errors
            continue
        weight = usable[:, :, None].astype(probs.dtype)
        mean = (probs * weight).sum(0) / np.maximum(weight.sum(0), 1.0)
        yield ids, mean, usable.any(0), errors


def check_same_labels(models: Sequence[MultimodalClassifier]) -> None:
    """Refuse an ensemble whose models predict different labels (their probabilities cannot be averaged)."""
    codec = models[0].codec
    for other in models[1:]:
        if tuple(other.codec.label_ids) != tuple(codec.label_ids):
            raise UsageError(f"the models of an ensemble must predict the same labels: {list(codec.label_ids)} vs "
                             f"{list(other.codec.label_ids)}")


def ensemble_thresholds(models: Sequence[MultimodalClassifier]) -> Optional[list[float]]:
    """The thresholds for the mean probabilities of ``models`` when none are given: `metrics.mean_thresholds` of
    those the models store (one model's are its own; None: 0.5 for every class).

    Raises:
        UsageError: the models predict different labels.
    """
    check_same_labels(models)
    return mean_thresholds([m.thresholds for m in models], models[0].codec.num_labels)


def predict_to_csv(model: MultimodalClassifier | Sequence[MultimodalClassifier], frame: pd.DataFrame,
                   image_dir: Optional[Path], output: str | Path, accelerator: Any = None, *, thresholds: Any = None,
                   probabilities: Optional[str | Path] = None, batch_size: int = 64, workers: int = 2,
                   skip_bad_images: bool = False, draft_size: Optional[int] | str = "auto", image_cache: Any = None,
                   channels_last: bool = True, decode_on_device: bool = False,
                   keep_probabilities: bool = False, share: bool = True) -> dict[str, Any]:
    """Predict every row of ``frame`` in order and write ``ImageID,Labels`` (original ids, space-separated).

    ``frame`` has ``ImageID`` and, for a caption branch, ``Caption`` (missing captions: empty); ``image_dir`` holds the
    images. ``accelerator`` (an Accelerate ``Accelerator``: device and mixed precision) defaults to a new one. The
    models are run in evaluation mode, and each is left in the mode it had.

    ``model`` may be a list of models with the same labels: an ensemble. Each runs with its own preprocessing
    (resolution, crop, vocabulary), all in step batch by batch, and the mean of their probabilities is thresholded
    at ``thresholds``, else at `ensemble_thresholds` (one model's: those it stores, else 0.5). With ``share``,
    models with the same preprocessing read one loader's batches (each image decoded once), and their image
    encoders' identical bottom (`shared_stem_stages`: e.g. the frozen part of models fine-tuned from the same
    pretrained weights) runs once per batch; the probabilities are those of the models run apart. Leave it off for
    encoders compiled with `model.ImageEncoder.compile_forward`, whose compiled path the split does not take.

    Speed options: ``draft_size`` (``"auto"``: `images.draft_size_for` the model's evaluation transform, so JPEGs at
    least twice the needed size are decoded at 1/2..1/8 scale; ``None``: full-size decoding) and ``image_cache``
    (a `data.ImageCache` built at the evaluation resize size, or one per model of an ensemble: images are read from
    it as uint8 and preprocessed by `images.BatchImageTransform`, batched on a GPU, per image in the DataLoader
    workers on a CPU), ``channels_last`` (the image encoder and its input in channels-last memory format, on CPU
    and GPU alike; the model is converted in place; see benchmarks/SPEED.md for the measured gains) and
    ``decode_on_device`` (the workers only read the files; `data.decode_images` decodes each batch where the model
    runs, nvJPEG on a GPU, then it is preprocessed there as from the image cache).

    Returns:
        ``rows`` written, ``bad_images`` (ImageID, error) pairs of images that could not be read and the
        ``thresholds`` applied; with ``keep_probabilities`` also ``probabilities`` [N, C] and ``usable`` [N] in row
        order (held in memory: for scoring against labels, `score_predictions`).
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    caches = list(image_cache) if isinstance(image_cache, (list, tuple)) else [image_cache] * len(models)
    if not models or len(caches) != len(models):
        raise ValueError(f"{len(models)} model(s) and {len(caches)} image cache(s)")
    if any(m.codec is None for m in models):
        raise ValueError("a model without a label codec (exported without one) cannot name its labels")
    if image_dir is None and any(m.image_encoder is not None for m in models):
        raise ValueError("the model has an image branch: give image_dir, the folder of the frame's ImageIDs")
    if thresholds is not None:
        check_thresholds(thresholds, models[0].codec.num_labels)
    if probabilities is not None and Path(probabilities).resolve() == Path(output).resolve():
        raise ValueError(f"probabilities and output name the same file ({output}): give each its own")
    if accelerator is None:
        from accelerate import Accelerator
        accelerator = Accelerator()
    modes = [m.training for m in models]  # iter_predictions switches them to evaluation; restored at the end
    try:
        return _predict_to_csv(models, caches, frame, image_dir, output, accelerator, thresholds=thresholds,
                               probabilities=probabilities, batch_size=batch_size, workers=workers,
                               skip_bad_images=skip_bad_images, draft_size=draft_size, channels_last=channels_last,
                               decode_on_device=decode_on_device, keep_probabilities=keep_probabilities,
                               share=share)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _predict_to_csv(models: list[MultimodalClassifier], caches: list[Any], frame: pd.DataFrame,
                    image_dir: Optional[Path], output: str | Path, accelerator: Any, *, thresholds: Any,
                    probabilities: Optional[str | Path], batch_size: int, workers: int, skip_bad_images: bool,
                    draft_size: Optional[int] | str, channels_last: bool, decode_on_device: bool,
                    keep_probabilities: bool, share: bool) -> dict[str, Any]:
    check_same_labels(models)
    codec = models[0].codec
    if thresholds is None:
        thresholds = ensemble_thresholds(models)
    thresholds = 0.5 if thresholds is None else thresholds
    groups: dict[Any, list[int]] = {}  # preprocessing -> the models (indices) that read the same batches
    for i, (m, c) in enumerate(zip(models, caches)):
        groups.setdefault(_preprocessing_key(m, c) if share else i, []).append(i)
    streams = [_group_batches([models[i] for i in members], frame, image_dir, accelerator, batch_size=batch_size,
                              workers=workers, skip_bad_images=skip_bad_images, draft_size=draft_size,
                              image_cache=caches[members[0]], channels_last=channels_last,
                              decode_on_device=decode_on_device, share_stem=share)
               for members in groups.values()]
    bad: list[tuple[str, str]] = []
    rows = 0
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if probabilities:
        Path(probabilities).parent.mkdir(parents=True, exist_ok=True)
    # Each file under a private temporary name, renamed into place when complete (`published`): nothing half-written
    # is left behind, and no other process's temporary file is touched. One that a killed prediction left (SIGKILL
    # runs no clean-up) is deleted by the next prediction into that file, a day later.
    for path in filter(None, (output, probabilities)):
        for stale in remove_stale_temporaries(Path(path).parent, of=Path(path).name):
            logger.info("removed %s, left by a prediction that was stopped", stale)
    with contextlib.ExitStack() as files:
        # both published before both opened: on leaving, both files are closed before either is renamed
        tmp_out = files.enter_context(published(output))
        tmp_prob = files.enter_context(published(probabilities)) if probabilities else None
        f_out = files.enter_context(open(tmp_out, "w", newline=""))
        f_p = files.enter_context(open(tmp_prob, "w", newline="")) if tmp_prob else None
        out = csv.writer(f_out)
        out.writerow(["ImageID", "Labels"])
        prob_writer = csv.writer(f_p) if f_p else None
        if prob_writer:
            prob_writer.writerow(["ImageID", *[str(i) for i in codec.label_ids]])
        for ids, probs, usable, errors in _ensemble(streams):
            bad.extend(errors)
            pred = binarize(probs, thresholds, at_least_one=True) & usable[:, None]
            for image_id, row in zip(ids, pred):
                out.writerow([image_id, " ".join(str(codec.label_ids[c]) for c in np.flatnonzero(row))])
            if prob_writer:  # no probabilities (nan) for a row that could not be predicted at all
                for image_id, p, ok in zip(ids, probs, usable):
                    prob_writer.writerow([image_id, *(f"{v:.6f}" if ok else "nan" for v in p)])
            if keep_probabilities:
                kept.append((probs.astype(np.float32), usable))
            rows += len(ids)
    result = {"rows": rows, "bad_images": bad, "thresholds": thresholds}
    if keep_probabilities:
        C = codec.num_labels
        result["probabilities"] = np.concatenate([k[0] for k in kept]) if kept else np.zeros((0, C), np.float32)
        result["usable"] = np.concatenate([k[1] for k in kept]) if kept else np.zeros(0, bool)
    return result


def label_targets(frame: pd.DataFrame, codec: Any, source: str | Path) -> np.ndarray:
    """Multi-hot [N, C] truth from the ``Labels`` column of an annotation frame, for the classes of ``codec``.

    Raises:
        AnnotationError: naming the file and the row's ImageID, for a label the model does not predict.
    """
    targets = np.zeros((len(frame), codec.num_labels), dtype=np.float32)
    for i, (image_id, labels) in enumerate(zip(frame["ImageID"], frame["Labels"])):
        try:
            targets[i] = codec.encode(labels)
        except ValueError as err:
            raise AnnotationError(source, None, f"{row_name(i, image_id)}: {err} (the model's labels)"
                                  ) from None
    return targets


def score_predictions(result: dict[str, Any], targets: np.ndarray, codec: Any) -> dict[str, Any]:
    """Metrics (`metrics.compute_metrics`) of `predict_to_csv`'s predictions (``keep_probabilities``) against
    ``targets``, at the thresholds it applied, so that they describe the label sets it wrote. Rows that could not be
    predicted at all (an unreadable image and no caption branch) are left out and counted."""
    usable = result["usable"]
    if not usable.any():  # e.g. an image-only model and no readable image: nothing to score
        return {"rows_scored": 0, "rows_not_predicted": int(len(usable))}
    metrics = compute_metrics(result["probabilities"][usable], targets[usable], result["thresholds"])
    # A class without positives has no AP, nor F1 if never predicted either: null in JSON (not NaN, which JSON lacks)
    for key in ("per_class_ap", "per_class_f1"):
        metrics[key] = [None if np.isnan(v) else v for v in metrics[key]]
    for key in ("map", "macro_f1"):
        metrics[key] = None if np.isnan(metrics[key]) else metrics[key]
    return {"rows_scored": int(usable.sum()), "rows_not_predicted": int((~usable).sum()),
            "thresholds": np.broadcast_to(np.asarray(result["thresholds"], dtype=float), (codec.num_labels,)).tolist(),
            **{k: v for k, v in metrics.items() if not k.startswith("per_class")},
            "per_class": {str(label): {"name": name, "f1": f1, "ap": ap, "support": int(targets[usable, c].sum())}
                          for c, (label, name, f1, ap) in enumerate(zip(codec.label_ids, codec.names,
                                                                         metrics["per_class_f1"],
                                                                         metrics["per_class_ap"]))}}


def _prepare_images(loader: Any, device: torch.device, transform: Any = None, channels_last: bool = False,
                    decoder: Optional[EncodedImageDecoder] = None,
                    skip_bad_images: bool = False) -> Iterator[dict[str, Any]]:
    """Batches whose images are moved to ``device`` (or decoded there from their files by ``decoder``) and there
    preprocessed (``transform``: cached uint8 images [B, S, S, 3] -> float [B, 3, s, s]) and/or made channels-last."""
    for batch in loader:
        if decoder is not None and "image_files" in batch:
            batch = decode_images(batch, decoder, skip_bad_images)
        if "image" in batch:
            image = batch["image"].to(device, non_blocking=True)
            image = transform(image) if transform is not None else image
            batch["image"] = image.contiguous(memory_format=torch.channels_last) if channels_last else image
        yield batch
