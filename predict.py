#!/usr/bin/env python3
"""Predict label sets with an exported model and write them as CSV (the competition's submission format).

    python predict.py --checkpoint runs/latest/model --data-dir ../shared/comp5329 --output predictions.csv
    python predict.py --checkpoint runs/latest/model --image-dir photos/ --output predictions.csv   # no captions
    python predict.py --checkpoint runs/latest/model --csv labelled.csv --image-dir photos/ --metrics scores.json

A CSV with a Labels column (the training format) is also scored: samples/micro/macro F1 and mAP are printed, and
written with the per-class figures to --metrics.

The model is rebuilt from the checkpoint folder alone (config.json, model.safetensors, tokenizer.json).
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a machine whose cores are shared (DataLoader workers, other jobs)
# spinning threads can slow every step several-fold. Set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Optional

from multimodal.cli import HelpFormatter  # standard library only: --help needs no torch

logger = logging.getLogger("multimodal")


DEFAULT_MODEL = "runs/latest/model"  # train.py's latest run


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # action="extend": "--checkpoint A B" and "--checkpoint A --checkpoint B" both give [A, B] (with nargs="+" alone
    # a repeated flag would replace the folders given before it, and the ensemble would silently lose its members).
    p.add_argument("--checkpoint", action="extend", nargs="+", default=None,
                   help="exported model folder; several folders (after one flag or each after its own) make an "
                        "ensemble: the mean of their probabilities, thresholded at --threshold, else at the mean of "
                        f"the thresholds the models store (0.5 for one that stores none) (default: {DEFAULT_MODEL})")
    p.add_argument("--data-dir", default=None, help="dataset folder (test.csv, data/)")
    p.add_argument("--csv", default=None,
                   help="CSV with ImageID,Caption, or ImageID,Labels,Caption to score the predictions too (default: "
                        "DATA_DIR/test.csv when present)")
    p.add_argument("--image-dir", default=None, help="image folder (default: DATA_DIR/data)")
    p.add_argument("--output", default="predictions.csv", help="ImageID,Labels CSV to write")
    p.add_argument("--probabilities", default=None, help="also write per-label probabilities to this CSV")
    p.add_argument("--metrics", default=None, metavar="JSON",
                   help="write the scores against the CSV's Labels column here (samples/micro/macro F1, mAP, "
                        "per-class F1, AP and support); needs a CSV with labels")
    p.add_argument("--threshold", type=float, default=None,
                   help="one threshold for all labels (overrides stored); every input keeps its most probable label "
                        "where none reaches it, so one above 1 predicts that label alone")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Accelerate precision (default: that of `accelerate launch --mixed_precision` or its "
                        "`accelerate config`, else no)")
    p.add_argument("--image-cache", default=None, metavar="DIR",
                   help="read images from a uint8 cache in DIR, resized once to the model's evaluation size and "
                        "built on first use: later predictions over the same images skip JPEG decoding "
                        "(invalidated when the images or the preprocessing change)")
    p.add_argument("--decode-on-device", action="store_true",
                   help="the loader workers only read the image files; decoding (JPEG: nvJPEG on a GPU), resizing "
                        "and normalising run batched where the model runs")
    p.add_argument("--compile", action="store_true",
                   help="compile the image encoders with torch.compile: faster batches after a compilation at the "
                        "start (forward 1.15x at 128 px on 2 CPU cores, see benchmarks/SPEED.md); pays off over "
                        "thousands of images")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="predict unreadable images from their caption (or no labels) and report them")
    p.add_argument("--no-draft", dest="draft", action="store_false",
                   help="decode every JPEG at full size, as train.py's validation does (default: a JPEG at least "
                        "twice the model's input size is decoded at 1/2 to 1/8 scale: faster, with slightly "
                        "different pixels, so scores of large photos differ a little from the validation's)")
    p.add_argument("--verify-images", action="store_true",
                   help="decode every image once, at 1/8 scale, before predicting, so that a corrupt file stops the "
                        "run at once with every bad row listed, not partway through (off by default: prediction "
                        "reads each image only once anyway)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Settings that cannot work, refused before anything is loaded."""
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        parser.error(f"--workers must not be negative, got {args.workers}")
    if args.threshold is not None and not args.threshold >= 0.0:  # NaN too
        parser.error(f"--threshold must be at least 0, got {args.threshold}")
    if not args.output:
        parser.error("--output must name a file")
    seen: dict[Path, str] = {}
    for flag, value, path in output_files(args):
        if path in seen:
            parser.error(f"{seen[path]} and {flag} name the same file ({value}): give each its own")
        seen[path] = flag
        if path.is_dir() or value.endswith(("/", os.sep)):
            parser.error(f"{flag} {value} is a folder: name a file in it")
        folder = next((p for p in path.parents if p.exists()), None)  # created if missing: it must be writable
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            parser.error(f"{flag} {value}: cannot write in {folder}")


def output_files(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    """The files the run writes: (flag, value given, resolved path), the report of unreadable images included."""
    given = [(flag, value, Path(value).resolve()) for flag, value in
             (("--output", args.output), ("--probabilities", args.probabilities), ("--metrics", args.metrics))
             if value]
    report = bad_images_report(args.output) if args.output else None
    return given + ([("the report of unreadable images", str(report), report.resolve())] if report else [])


def bad_images_report(output: str) -> Path:
    """Where the rows whose image could not be read are listed (beside --output)."""
    return Path(output).with_suffix(".bad_images.csv")


def check_inputs(args: argparse.Namespace, csv_file: Optional[Path], image_dir: Optional[Path],
                 models: list) -> None:
    """What the resolved inputs cannot give the models, and outputs that would overwrite the input."""
    from multimodal.config import UsageError
    from multimodal.inference import IMAGE_SUFFIXES

    for flag, value, path in output_files(args):
        if csv_file is not None and path == csv_file.resolve():
            raise UsageError(f"{flag} {value} is the input CSV: it would be overwritten; write elsewhere")
        for checkpoint in args.checkpoint:
            if path.is_relative_to(Path(checkpoint).resolve()):
                raise UsageError(f"{flag} {value} is in the model folder {checkpoint}: it would change the model; "
                                 "write elsewhere")
        if image_dir is not None and path.is_relative_to(image_dir.resolve()) and path.is_file() \
                and path.suffix.lower() in IMAGE_SUFFIXES:  # an earlier predictions file there may be replaced
            raise UsageError(f"{flag} {value} is an image of the image folder {image_dir}: it would be overwritten; "
                             "write elsewhere")
    if image_dir is None and any(m.image_encoder is not None for m in models):
        raise UsageError(f"the model{'s' if len(models) > 1 else ''} read{'' if len(models) > 1 else 's'} images: "
                         f"give --image-dir (the folder of {csv_file}'s images) or --data-dir")
    if csv_file is None and all(m.image_encoder is None for m in models):
        raise UsageError("the model reads captions only (no image branch), and a folder of images has none: give "
                         "--csv with a Caption column (or --data-dir with a test.csv)")


def main(args: argparse.Namespace) -> int:
    # Imported here, after parsing, so that --help needs no torch.
    from accelerate import Accelerator

    from multimodal.annotations import AnnotationError
    from multimodal.config import UsageError, save_json
    from multimodal.engine import precision_warning
    from multimodal.inference import (check_same_labels, ensemble_thresholds, label_targets, predict_to_csv,
                                      resolve_inputs, score_predictions)
    from multimodal.metrics import describe_thresholds
    from multimodal.model import MultimodalClassifier
    from multimodal.training import launch_variables

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    launched, ranked = launch_variables()
    if accelerator.num_processes > 1 or launched or ranked:  # each process would predict every row into one file
        seen = ", ".join(f"{k}={v}" for k, v in {**launched, **ranked}.items())
        raise UsageError(f"predict.py predicts in one process ({seen or f'{accelerator.num_processes} processes'} "
                         "here): run it with `python predict.py`, not under a launcher of several processes")
    precision = precision_warning(accelerator.mixed_precision, accelerator.device)
    if precision:
        logger.warning(precision)
    models = [MultimodalClassifier.from_pretrained(c).to(accelerator.device) for c in args.checkpoint]
    check_same_labels(models)  # before any image is read
    if args.compile:
        for model in models:
            if model.image_encoder is not None:
                model.image_encoder.compile_forward()
    frame, image_dir, csv_file = resolve_inputs(args.data_dir, args.csv, args.image_dir)
    check_inputs(args, csv_file, image_dir, models)
    source = csv_file or image_dir  # what the rows came from, for messages
    targets = None
    if "Labels" in frame:  # checked before predicting: a label the models do not know stops the run now
        targets = label_targets(frame, models[0].codec, source)
    elif args.metrics:
        raise AnnotationError(source, None, "--metrics scores the predictions against a Labels column, and this "
                                            "input has none (give a CSV with ImageID,Labels,Caption)")
    with_captions = any(m.caption_encoder is not None for m in models)
    if csv_file is None and with_captions:
        logger.warning("no captions given: the caption branch sees empty captions for all %d images", len(frame))
    if all(m.image_encoder is None for m in models):
        image_dir = None
    caches = [None] * len(models)
    if args.image_cache and args.decode_on_device:
        raise SystemExit("--decode-on-device decodes the image files: it cannot be combined with --image-cache")
    if args.verify_images and image_dir is not None and not args.skip_bad_images:  # before a cache build too
        from multimodal.training import verify_images
        verify_images(frame, image_dir, args.workers, accelerator)
    if args.image_cache and image_dir is not None:
        from multimodal.data import build_model_image_cache
        caches = [build_model_image_cache(m.config, frame["ImageID"], image_dir, args.image_cache,
                                          workers=args.workers, skip_bad_images=args.skip_bad_images)
                  if m.image_encoder is not None else None for m in models]
    thresholds = args.threshold if args.threshold is not None else ensemble_thresholds(models)
    logger.info("%s, threshold %s%s", "one model" if len(models) == 1 else
                f"ensemble of {len(models)} models: mean probabilities", describe_thresholds(thresholds),
                "" if args.threshold is not None or thresholds is None else
                " (stored)" if len(models) == 1 else " (the mean of the stored ones)")
    result = predict_to_csv(models, frame, image_dir, args.output, accelerator, thresholds=thresholds,
                            probabilities=args.probabilities, batch_size=args.batch_size, workers=args.workers,
                            skip_bad_images=args.skip_bad_images, image_cache=caches,
                            draft_size="auto" if args.draft else None,
                            decode_on_device=args.decode_on_device, keep_probabilities=targets is not None,
                            share=not args.compile)  # a shared stem would bypass the compiled encoders
    logger.info("wrote %d predictions to %s", result["rows"], args.output)
    if targets is not None:
        scores = score_predictions(result, targets, models[0].codec)
        if not scores["rows_scored"]:
            logger.warning("no row of %s could be predicted: nothing scored", source)
        else:
            logger.info("scored against the labels of %s (%d rows%s): samples F1 %.4f, micro F1 %.4f, macro F1 "
                        "%s, mAP %s", source, scores["rows_scored"],
                        f", {scores['rows_not_predicted']} not predicted" if scores["rows_not_predicted"] else "",
                        scores["samples_f1"], scores["micro_f1"],
                        *("-" if scores[k] is None else f"{scores[k]:.4f}" for k in ("macro_f1", "map")))
        if args.metrics:
            save_json({"checkpoints": [str(c) for c in args.checkpoint], "csv": str(source), **scores}, args.metrics)
            logger.info("wrote the scores to %s", args.metrics)
    report = bad_images_report(args.output)
    report.unlink(missing_ok=True)  # a report from an earlier run would not describe this one
    if result["bad_images"]:
        with open(report, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageID", "error"])
            writer.writerows(result["bad_images"])
        logger.warning("%d image(s) could not be read and were predicted %s; listed in %s",
                       len(result["bad_images"]),
                       "from their caption" if with_captions else "as no labels", report)
    return 0


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    args.checkpoint = args.checkpoint or [DEFAULT_MODEL]
    from multimodal.training import run_cli

    sys.exit(run_cli(main, args, interrupted="no output file was written"))
