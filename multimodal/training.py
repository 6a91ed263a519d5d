"""Orchestration of a training run: what `train.py` does after parsing its arguments.

Split into the steps a reader looks for: the run folder, the data, the model, the loop, the export. Everything
reusable (loops, checkpoints, metrics) lives in `engine.py` and `metrics.py`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import broadcast_object_list, is_tensorboard_available, set_seed
from torch.utils.data import DataLoader

from .annotations import read_annotations
from .config import LossConfig, ModelConfig, save_json
from .data import Collator, ImageCaptionDataset, train_val_split
from .features import FeatureDataset, cached_features
from .engine import (CheckpointManager, JSONLinesTracker, Progress, build_optimizer, collect_predictions, evaluate,
                     lr_lambda, resolve_checkpoint, train_one_epoch)
from .images import build_transform
from .labels import LabelCodec
from .losses import JointLoss
from .metrics import binarize, compute_metrics, samples_f1, tune_thresholds
from .model import MultimodalClassifier
from .text import PAD_ID, train_caption_tokenizer

logger = logging.getLogger("multimodal")

# Test seam: SIGKILL this process right after the checkpoint of this step is complete (resume tests).
KILL_AFTER_CHECKPOINT_ENV = "MULTIMODAL_KILL_AFTER_CHECKPOINT"
# Arguments a resumed run takes from its command line instead of the saved run configuration.
RESUME_OVERRIDES = ("resume", "workers")


def resolve_presets(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the data: the demo data is small and low-resolution."""
    demo = args.data_dir is None and args.train_csv is None
    if args.image_size is None:
        args.image_size = 64 if demo else 224
    if args.epochs is None:
        args.epochs = 8 if demo else 10
    if args.backbone_lr is None:
        args.backbone_lr = args.lr / 4 if (args.pretrained or args.pretrained_file) else args.lr
    return args


def check_launch(state: PartialState) -> None:
    """Stop a misconfigured launch where N processes each believe they are the only one (duplicate training)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and state.num_processes != world:
        raise SystemExit(
            f"launched as {world} processes (WORLD_SIZE={world}) but Accelerate sees {state.num_processes}: "
            f"each process would train its own copy. On a machine without GPUs set ACCELERATE_USE_CPU=true "
            f"(`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {world} train.py ...`).")


def make_run_dir(args: argparse.Namespace, state: PartialState) -> Path:
    """The run folder, agreed by every process; a default one is linked from ``runs/latest``."""
    if args.output_dir is not None:
        run_dir = Path(args.output_dir)
    else:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)
        run_dir = Path("runs") / stamp[0]
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.output_dir is None:
            link = run_dir.parent / "latest"
            tmp = run_dir.parent / ".latest.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(run_dir.name)
            os.replace(tmp, link)
    state.wait_for_everyone()
    return run_dir


def restore_args(args: argparse.Namespace) -> tuple[argparse.Namespace, Path, Path]:
    """For ``--resume``: the checkpoint, its run folder, and the run's saved arguments."""
    checkpoint = resolve_checkpoint(args.resume)
    run_dir = checkpoint.parent.parent
    saved = json.loads((run_dir / "run_config.json").read_text())["args"]
    saved.update({k: getattr(args, k) for k in RESUME_OVERRIDES})
    saved["output_dir"] = str(run_dir)
    return argparse.Namespace(**saved), checkpoint, run_dir


def load_frames(args: argparse.Namespace, accelerator: Accelerator) -> tuple[pd.DataFrame, Path, Optional[Path]]:
    """The annotation frame, the image folder and the label-names file, generating the demo data if needed."""
    if args.data_dir is None and args.train_csv is None:
        from .demo import ensure_demo_data
        with accelerator.main_process_first():
            data_dir = ensure_demo_data(args.demo_dir)
    else:
        data_dir = Path(args.data_dir) if args.data_dir else Path(args.train_csv).parent
    train_csv = Path(args.train_csv) if args.train_csv else data_dir / "train.csv"
    image_dir = Path(args.image_dir) if args.image_dir else data_dir / "data"
    names = Path(args.label_names) if args.label_names else data_dir / "label_names.csv"
    frame = read_annotations(train_csv)
    if "Labels" not in frame:
        raise ValueError(f"{train_csv}: a training file needs a Labels column")
    if args.limit:
        frame = frame.iloc[: args.limit].reset_index(drop=True)
    return frame, image_dir, names if names.is_file() else None


def build_model_config(args: argparse.Namespace, codec: LabelCodec, tokenizer: Any,
                       frame: pd.DataFrame) -> ModelConfig:
    return ModelConfig(
        num_labels=codec.num_labels,
        image_encoder=None if args.no_image else args.encoder,
        image_size=args.image_size,
        vocab_size=None if args.no_caption else tokenizer.get_vocab_size(),
        pad_id=PAD_ID,
        word_dim=args.word_dim,
        caption_hidden=args.caption_hidden,
        caption_layers=args.caption_layers,
        use_decoder=not args.no_decoder,
        max_labels=int(frame["Labels"].map(len).max()),
        beam_width=args.beam_width,
        dropout=args.dropout,
        combine=args.combine,
    )


def make_loaders(args: argparse.Namespace, config: ModelConfig, frames: tuple[pd.DataFrame, pd.DataFrame],
                 image_dir: Path, codec: LabelCodec, tokenizer: Any,
                 features: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders; with ``features`` (cached pooled image features of every row of the full
    frame, see `features.cached_features`) the samples carry those instead of images."""
    loaders = []
    for frame, training in zip(frames, (True, False)):
        with_images = config.use_image and features is None
        transform = build_transform(config.image_encoder, config.image_size, training) if with_images else None
        dataset = ImageCaptionDataset(frame, image_dir if with_images else None, codec, tokenizer, transform,
                                      skip_bad_images=args.skip_bad_images,
                                      max_caption_length=args.max_caption_length)
        if with_images and not args.skip_bad_images:
            dataset.check_images()  # fail fast, naming the file and row, before any training
        if features is not None:
            dataset = FeatureDataset(dataset, *features, rows=frame["_row"])
        loaders.append(DataLoader(
            dataset, batch_size=args.batch_size, shuffle=training, num_workers=args.workers,
            collate_fn=Collator(pad_id=PAD_ID), pin_memory=torch.cuda.is_available(),
            persistent_workers=args.workers > 0, drop_last=False,
            generator=torch.Generator().manual_seed(args.seed)))
    return loaders[0], loaders[1]


def trivial_baseline(train_frame: pd.DataFrame, val_targets: np.ndarray, codec: LabelCodec) -> float:
    """Samples-F1 of always answering the labels that are on at least half the training images (at least one)."""
    freq = np.stack([codec.encode(labels) for labels in train_frame["Labels"]]).mean(axis=0)
    pred = binarize(np.tile(freq, (len(val_targets), 1)), 0.5)
    return float(samples_f1(pred, val_targets).mean())


def param_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise here
    checkpoint: Optional[Path] = None
    if args.resume:
        args, checkpoint, _ = restore_args(args)

    state = PartialState()
    check_launch(state)
    run_dir = make_run_dir(args, state)
    trackers: list[Any] = [JSONLinesTracker(run_dir / "log.jsonl")]
    if is_tensorboard_available():
        trackers.append("tensorboard")
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with=trackers, project_dir=str(run_dir))
    accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items()
                                                     if isinstance(v, (int, float, str, bool))})
    set_seed(args.seed)
    log = logger.info if accelerator.is_main_process else (lambda *a, **k: None)

    # Data, label codec and caption vocabulary (the latter two are saved with the run and reused on resume).
    frame, image_dir, names_csv = load_frames(args, accelerator)
    frame["_row"] = np.arange(len(frame))  # position in the full frame, for cached features
    train_frame, val_frame = train_val_split(frame, args.val_fraction, args.seed)
    if checkpoint is not None:
        codec = LabelCodec.load(run_dir / "labels.json")
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    else:
        names = LabelCodec.load_names(names_csv) if names_csv else None
        codec = LabelCodec.from_labels(frame["Labels"], names=names)
        tokenizer = train_caption_tokenizer(train_frame["Caption"], min_frequency=args.min_word_freq)
    config = build_model_config(args, codec, tokenizer, frame)
    if accelerator.is_main_process:
        codec.save(run_dir / "labels.json")
        tokenizer.save(str(run_dir / "tokenizer.json"))
        save_json({"args": vars(args), "model": config.to_dict(), "num_processes": accelerator.num_processes,
                   "train_rows": len(train_frame), "val_rows": len(val_frame)}, run_dir / "run_config.json")
    log(f"run folder {run_dir}: {len(train_frame)} training and {len(val_frame)} validation rows, "
        f"{codec.num_labels} classes, vocabulary {tokenizer.get_vocab_size()}, {accelerator.num_processes} process(es)")

    # Model, loss, optimisation.
    # A resumed run gets its weights from the checkpoint, except that cached features are keyed by the pretrained ones.
    pretrained = args.pretrained_file or args.pretrained if checkpoint is None or args.cache_features else False
    model = MultimodalClassifier(config, pretrained=pretrained)
    if model.image_encoder is not None:
        log(f"image encoder {config.image_encoder}: weights from {model.image_encoder.pretrained_source}")
    if args.glove and config.use_caption and checkpoint is None:
        hits = model.caption_encoder.load_glove(args.glove, tokenizer.get_vocab())
        log(f"GloVe: {hits} of {tokenizer.get_vocab_size()} words initialised from {args.glove}")
    features = None
    if args.cache_features and model.image_encoder is not None:
        args.freeze_image_encoder = True
        with accelerator.main_process_first():  # the main process computes and writes, the others read the cache
            features = cached_features(model.image_encoder, frame, image_dir, config.image_size, args.cache_features,
                                       batch_size=2 * args.batch_size, workers=args.workers,
                                       device=accelerator.device, skip_bad_images=args.skip_bad_images)
    frozen = []
    if args.freeze_image_encoder and model.image_encoder is not None:
        model.image_encoder.requires_grad_(False)
        frozen.append(model.image_encoder)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = JointLoss(LossConfig(decoder_weight=args.decoder_loss_weight, focal_gamma=args.focal_gamma))
    train_loader, val_loader = make_loaders(args, config, (train_frame, val_frame), image_dir, codec, tokenizer,
                                            features)
    optimizer = build_optimizer(model, args.lr, args.backbone_lr, args.weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = -(-len(train_loader) // args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 20)
    # Accelerate steps a prepared scheduler once per process per optimizer step: count in those units.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps * accelerator.num_processes, warmup * accelerator.num_processes))
    scheduler = accelerator.prepare(scheduler)

    checkpoints = CheckpointManager(accelerator, run_dir, keep=args.keep_checkpoints)
    progress = Progress()
    if checkpoint is not None:
        progress = checkpoints.load(checkpoint)
        log(f"resumed from {checkpoint}: epoch {progress.epoch}, batch {progress.batches_done}, step {progress.step}")
    kill_at = int(os.environ.get(KILL_AFTER_CHECKPOINT_ENV, "0"))

    def on_checkpoint(p: Progress) -> None:
        if kill_at and p.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    bad_images: list[str] = []
    seen_ids: list[str] = []
    val_metrics: dict[str, Any] = {}
    t_start = time.perf_counter()
    while progress.epoch < args.epochs and not (args.max_steps and progress.step >= args.max_steps):
        train_loader.set_epoch(progress.epoch)
        loader = train_loader
        if progress.batches_done:
            loader = accelerator.skip_first_batches(train_loader, progress.batches_done)
            loader.set_epoch(progress.epoch)
        terms = train_one_epoch(
            model, loader, criterion, optimizer, scheduler, accelerator, progress,
            total_batches=len(train_loader), max_steps=args.max_steps, log_every=args.log_every,
            checkpoint_every=args.checkpoint_every, checkpoints=checkpoints, on_checkpoint=on_checkpoint,
            bad_images=bad_images, use_image=config.use_image, frozen=frozen, seen_ids=seen_ids)
        epoch_done = progress.batches_done >= len(train_loader)
        if len(val_frame):
            predictions = collect_predictions(model, val_loader, accelerator)
            val_metrics = evaluate(predictions)
            accelerator.log({f"val/{out}/{k}": v for out, m in val_metrics.items() for k, v in m.items()
                             if not k.startswith("per_class")} | {f"train_epoch/{k}": v for k, v in terms.items()}
                            | {"epoch": progress.epoch}, step=progress.step)
            log(f"epoch {progress.epoch}: loss {terms.get('loss', float('nan')):.4f}  val samples-F1 " +
                "  ".join(f"{out} {m['samples_f1']:.4f}" for out, m in val_metrics.items()))
        if epoch_done:
            progress.epoch += 1
            progress.batches_done = 0
            checkpoints.save(progress)
    train_seconds = time.perf_counter() - t_start

    # Export: thresholds, the model, metrics and charts; only the main process writes.
    summary: dict[str, Any] = {"train_seconds": train_seconds, "steps": progress.step}
    thresholds = None
    if len(val_frame):
        predictions = collect_predictions(model, val_loader, accelerator)
        targets = predictions["targets"]
        final = compute_metrics(predictions["final"], targets, 0.5)
        summary.update(num_val_samples=int(len(targets)), val_index=predictions["index"].astype(int).tolist(),
                       trivial_samples_f1=trivial_baseline(train_frame, targets, codec),
                       val=evaluate(predictions))
        if args.tune_thresholds:
            thresholds = tune_thresholds(predictions["final"], targets).tolist()
            summary["val_tuned"] = compute_metrics(predictions["final"], targets, thresholds)
        log(f"validation samples-F1 {final['samples_f1']:.4f} (trivial baseline: always the most frequent labels, "
            f"{summary['trivial_samples_f1']:.4f})" + (f"; with tuned thresholds {summary['val_tuned']['samples_f1']:.4f}"
                                                       if thresholds else ""))
    summary["param_checksum_per_rank"] = accelerator.gather(
        torch.tensor([param_checksum(model)], dtype=torch.float64, device=accelerator.device)).tolist()
    seen_per_rank = accelerator.gather_for_metrics([seen_ids], use_gather_object=True)
    bad_all = sorted(set(accelerator.gather_for_metrics(bad_images, use_gather_object=True)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        core = accelerator.unwrap_model(model)
        export_dir = run_dir / "model"
        core.save_pretrained(export_dir, codec=codec, tokenizer=tokenizer if config.use_caption else None,
                             thresholds=thresholds)
        summary["data_order_per_rank"] = seen_per_rank
        if bad_all:
            summary["bad_images"] = bad_all
            log(f"skipped {len(bad_all)} unreadable image(s): {', '.join(bad_all[:20])}"
                + (" ..." if len(bad_all) > 20 else ""))
        save_json(summary, run_dir / "metrics.json")
        if not args.no_plots:
            from .plots import plot_per_class_f1, plot_training_curves
            plot_training_curves(run_dir / "log.jsonl", run_dir / "training_curves.png")
            if val_metrics:
                plot_per_class_f1({out: m["per_class_f1"] for out, m in summary["val"].items()},
                                  list(codec.names), run_dir / "per_class_f1.png")
        log(f"exported {export_dir}")
    accelerator.end_training()
    return 0
