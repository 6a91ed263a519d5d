"""Orchestration of a training run: what `train.py` does after parsing its arguments.

Split into the steps a reader looks for: the run folder, the data, the model, the loop, the export. Everything
reusable (loops, checkpoints, metrics) lives in `engine.py` and `metrics.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import re
import signal
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import (broadcast_object_list, gather_object, is_tensorboard_available, parse_flag_from_env,
                               set_seed)
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from .annotations import AnnotationError, read_annotations
from .config import RESUME_OVERRIDES, LossConfig, ModelConfig, UsageError, save_json
from .data import (Collator, ImageCaptionDataset, bounded_heap_worker_init, build_model_image_cache, decode_images,
                   subsample_rows, train_val_split, unreadable_images_error)
from .features import FeatureDataset, cached_features
from .engine import (CheckpointError, CheckpointManager, JSONLinesTracker, Progress, SeededAugmentation, build_ema,
                     build_optimizer, collect_predictions, derived_seed, evaluate, find_checkpoints, lr_lambda,
                     precision_warning, predicted_rows, train_one_epoch, usable_checkpoint)
from .images import BatchImageTransform, EncodedImageDecoder, ImageLoadError, build_transform
from .labels import LabelCodec
from .losses import JointLoss
from .metrics import binarize, compute_metrics, samples_f1, select_thresholds
from .model import ModelFolderError, MultimodalClassifier
from .pretrained import PretrainedWeightsError
from .text import PAD_ID, train_caption_tokenizer
from .word_vectors import word_vector_dim

logger = logging.getLogger("multimodal")

# Test seam: SIGKILL this process right after the checkpoint of this step is complete (resume tests).
KILL_AFTER_CHECKPOINT_ENV = "MULTIMODAL_KILL_AFTER_CHECKPOINT"
# Errors in the user's input or settings, which the scripts report in one line instead of a traceback.
# OSError's subclasses for a path that cannot be used as given (a read-only folder, a file where a folder is expected)
# name the path in their message: enough for the user, without a traceback.
USER_ERRORS = (AnnotationError, ImageLoadError, FileNotFoundError, FloatingPointError, UsageError, ModelFolderError,
               PretrainedWeightsError, CheckpointError, PermissionError, IsADirectoryError, NotADirectoryError,
               FileExistsError)
_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process")


def worker_error_name(err: BaseException) -> Optional[str]:
    """The type name of the error a DataLoader worker raised, when ``err`` is torch's re-raise of it in the main
    process (a RuntimeError that names it), else None."""
    match = _WORKER_ERROR.match(str(err)) if isinstance(err, RuntimeError) else None
    return None if match is None else match[1]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `kill`), raised where the script is, so that it cleans up as on Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def run_cli(main: Callable[[argparse.Namespace], int], args: argparse.Namespace,
            interrupted: Optional[str | Callable[[], str]] = None) -> int:
    """Run a script's ``main``: an input error (malformed CSV, missing or corrupt image, missing file, non-finite
    loss, settings that cannot work) ends it with one ``error: ...`` line on stderr and exit status 1 instead of a
    traceback; Ctrl-C with one ``interrupted`` line (``interrupted``: what the user should know) and status 130;
    SIGTERM as Ctrl-C (temporary files removed), with ``terminated`` and status 143."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main(args)
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        if callable(interrupted):  # what the user should know depends on how far main got
            interrupted = interrupted()
        print(("terminated" if terminated else "interrupted") + (f": {interrupted}" if interrupted else ""),
              file=sys.stderr, flush=True)
        return 143 if terminated else 130
    except USER_ERRORS as err:
        message = str(err)
    except RuntimeError as err:  # re-raised from a DataLoader worker: the original error is the text's last line
        name = worker_error_name(err)
        if name not in {cls.__name__ for cls in USER_ERRORS}:
            raise
        last = str(err).strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(name) else last
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


# train.py's arguments that name files or folders (not --output-dir: a resume finds the run folder by --resume)
PATH_ARGS = ("data_dir", "train_csv", "image_dir", "label_names", "demo_dir", "pretrained_file", "cache_features",
             "image_cache")


def resolve_presets(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the data (the demo data is small and low-resolution), and make a new run's
    paths absolute: they are saved with its arguments, and ``--resume`` from another working directory must find the
    same files (a relative ``--data-dir ../d`` was looked for beside the new directory)."""
    demo = args.data_dir is None and args.train_csv is None
    if not args.resume:
        for name in PATH_ARGS:
            value = getattr(args, name, None)
            if value:
                setattr(args, name, str(Path(value).absolute()))  # not normalised: `link/..` stays the OS's
        if getattr(args, "glove", None) and os.path.exists(args.glove):  # a file or folder; a package name stays
            args.glove = str(Path(args.glove).absolute())
    if args.image_size is None:
        args.image_size = 64 if demo else 224
    if args.epochs is None:
        args.epochs = 8 if demo else 10
    if args.backbone_lr is None:
        args.backbone_lr = args.lr / 4 if (args.pretrained or args.pretrained_file) else args.lr
    if getattr(args, "word_dim", None) is None:
        glove = getattr(args, "glove", None) and not args.no_caption
        args.word_dim = word_vector_dim(args.glove) if glove else 128
    return args


# Environment variables by which launchers tell a process how many processes there are and which one it is:
# torchrun / `accelerate launch` (WORLD_SIZE, RANK, LOCAL_RANK), the MPI implementations Accelerate reads, and Slurm's
# srun (SLURM_STEP_NUM_TASKS is set inside a job step only, not in a batch script that merely asked for --ntasks).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
RANK_VARS = ("RANK", "LOCAL_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def launch_variables() -> tuple[dict[str, int], dict[str, int]]:
    """The launcher's variables that say this is one of several processes: the process counts above 1 and the ranks
    above 0 (`WORLD_SIZE_VARS`, `RANK_VARS`)."""
    def env_int(name: str) -> int:
        try:
            return int(os.environ.get(name, ""))
        except ValueError:
            return -1

    return ({name: env_int(name) for name in WORLD_SIZE_VARS if env_int(name) > 1},
            {name: env_int(name) for name in RANK_VARS if env_int(name) > 0})


def check_launch(state: PartialState) -> None:
    """Stop a misconfigured launch where N processes each believe they are the only one (duplicate training).

    That happens when a launcher starts several processes but Accelerate does not set up a process group, e.g.
    ``accelerate launch --multi_gpu`` or ``torchrun`` on a machine without GPUs and without ``ACCELERATE_USE_CPU``,
    or ``mpirun`` without it: every process then sees itself as process 0 of 1.
    """
    launched, ranked = launch_variables()
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in launched else max(launched.values(), default=1)
    if (state.num_processes == 1 and (launched or ranked)) or (
            "WORLD_SIZE" in launched and state.num_processes != world):
        seen = ", ".join(f"{k}={v}" for k, v in {**launched, **ranked}.items())
        raise SystemExit(
            f"error: launched as several processes ({seen}) but Accelerate sees {state.num_processes} process(es) "
            f"(distributed type {state.distributed_type.value}): each process would train its own copy. On a machine "
            f"without GPUs set ACCELERATE_USE_CPU=true (`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            f"--num_processes {world} train.py ...`)."
            + (" Under Slurm, let srun start one `accelerate launch` per node (`srun --ntasks-per-node=1 accelerate "
               "launch --num_machines N --machine_rank $SLURM_NODEID ...`), not one train.py per process."
               if any(name.startswith("SLURM_") for name in {**launched, **ranked}) else ""))


def new_run_name(root: Path) -> str:
    """Create ``root/<timestamp>`` (``<timestamp>-1``, ... when runs start within the same second) and name it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        name = stamp if i == 0 else f"{stamp}-{i}"
        try:
            (root / name).mkdir(parents=True)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"{root}: no free run folder name for {stamp}")


# What a run writes into its folder: a new run in the folder of an earlier one removes them first (and nothing else).
RUN_FILES = ("checkpoints", "model", "tensorboard", "log.jsonl", "run_config.json", "labels.json", "tokenizer.json",
             "metrics.json", "val_predictions.npz", "training_curves.png", "per_class_f1.png")


def check_output_dir(args: argparse.Namespace, resuming: bool) -> None:
    """A new run refuses an ``--output-dir`` that holds an earlier run's checkpoints or exported model, unless
    ``--overwrite``: the two would share checkpoints (the new run's pruned in favour of the old run's later steps,
    and resumed from them) and files that no longer match the old run's model. Checked before the data is read."""
    if args.output_dir is None or resuming or getattr(args, "overwrite", False):
        return
    run_dir = Path(args.output_dir)
    done = CheckpointManager.complete(run_dir)
    earlier = ([f"{len(done)} checkpoint(s)"] if done else []) + (
        ["an exported model"] if (run_dir / "model" / "config.json").is_file() else [])
    if earlier:
        resume = f"`--resume {run_dir}` continues it, " if done else ""
        raise UsageError(f"--output-dir {run_dir} holds an earlier run ({', '.join(earlier)}): {resume}--overwrite "
                         "deletes it and starts a new one; or choose another folder")


def make_run_dir(args: argparse.Namespace, state: PartialState, resuming: bool = False) -> Path:
    """The run folder, agreed by every process (`link_latest` links a default one from ``runs/latest``).

    A new run in an existing ``--output-dir`` (one `check_output_dir` let through: ``--overwrite``, or a run stopped
    before its first checkpoint) starts clean: the earlier run's `RUN_FILES` are deleted, other files are left.
    """
    if args.output_dir is not None:
        run_dir = Path(args.output_dir)
        if not resuming and state.is_main_process:
            stale = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
            for path in stale:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            if stale:
                logger.warning(f"deleted the earlier run's files in {run_dir}: "
                               f"{', '.join(p.name for p in stale)}")
    else:
        name = [new_run_name(Path("runs")) if state.is_main_process else None]
        broadcast_object_list(name)
        run_dir = Path("runs") / name[0]
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    return run_dir


def link_latest(args: argparse.Namespace, run_dir: Path, state: PartialState) -> None:
    """Point ``runs/latest`` at a default run folder (atomically), once the run is set up and about to train: a run
    that stops on its settings, weights or images leaves the link on the last run that trained, which the default
    `predict.py` and ``--resume latest`` use."""
    if args.output_dir is None and state.is_main_process:
        link = run_dir.parent / "latest"
        tmp = run_dir.parent / ".latest.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)


def restore_args(args: argparse.Namespace, state: PartialState) -> tuple[argparse.Namespace, Path]:
    """For ``--resume``: the run's saved arguments and the checkpoint to resume, once this launch is known to have
    the run's number of processes (each process's data shard and the schedule's length depend on it)."""
    run_dir, candidates = find_checkpoints(args.resume)
    config = json.loads((run_dir / "run_config.json").read_text())
    processes = config.get("num_processes")
    if processes is not None and processes != state.num_processes:
        raise UsageError(f"{candidates[0]} was written by a run of {processes} process(es) and this one has "
                         f"{state.num_processes}: each process's data shard and the schedule's length depend on "
                         f"it, so resume it with {processes} process(es)")
    # Checked (every file hashed) by the main process alone; all resume from its choice, or stop with its error.
    chosen: list[Optional[str]] = [None, None]
    if state.is_main_process:
        try:
            chosen = [str(usable_checkpoint(args.resume, run_dir, candidates)), None]
        except CheckpointError as error:
            chosen = [None, str(error)]
    if state.num_processes > 1:
        broadcast_object_list(chosen)
    if chosen[1] is not None:
        raise CheckpointError(chosen[1])
    checkpoint = Path(chosen[0])
    saved = config["args"]
    sticky = {"skip_bad_images": saved.get("skip_bad_images", False) or args.skip_bad_images,
              "verify_images": saved.get("verify_images") if args.verify_images is None else args.verify_images}
    saved.update({k: getattr(args, k) for k in RESUME_OVERRIDES} | sticky)
    saved["output_dir"] = str(run_dir)
    return argparse.Namespace(**saved), checkpoint


def data_fingerprint(train_frame: pd.DataFrame, val_frame: pd.DataFrame) -> str:
    """A hash of the rows a run trains and validates on (image ids, labels, captions, and which split each is in)."""
    digest = hashlib.sha256()
    for name, frame in (("train", train_frame), ("val", val_frame)):
        digest.update(f"{name}:{len(frame)}\n".encode())
        columns = [c for c in ("ImageID", "Labels", "Caption") if c in frame.columns]
        for row in frame[columns].itertuples(index=False, name=None):
            digest.update(repr(row).encode() + b"\n")
    return digest.hexdigest()


def check_same_data(run_dir: Path, fingerprint: str) -> None:
    """Refuses to resume a run whose training data changed since it started (a row added, removed or edited): its
    split, vocabulary and data order would no longer be the checkpoint's. Runs that recorded no fingerprint pass."""
    saved = json.loads((run_dir / "run_config.json").read_text()).get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise UsageError(f"the training data changed since the run in {run_dir} started (rows, labels or captions "
                         "of its annotation file): resuming would continue on other rows than its checkpoints were "
                         "trained on. Restore the data the run started with, or start a new run")


def load_frames(args: argparse.Namespace, state: PartialState) -> tuple[pd.DataFrame, Path, Optional[Path]]:
    """The annotation frame, the image folder and the label-names file, generating the demo data if needed."""
    if args.data_dir is None and args.train_csv is None:
        from .demo import ensure_demo_data
        with state.main_process_first():
            data_dir = ensure_demo_data(args.demo_dir)
    else:
        data_dir = Path(args.data_dir) if args.data_dir else Path(args.train_csv).parent
    train_csv = Path(args.train_csv) if args.train_csv else data_dir / "train.csv"
    # As predict.py finds them: DATA_DIR/data, else the images beside the CSV
    image_dir = Path(args.image_dir) if args.image_dir else \
        data_dir / "data" if (data_dir / "data").is_dir() else data_dir
    names = Path(args.label_names) if args.label_names else data_dir / "label_names.csv"
    frame = read_annotations(train_csv)
    if "Labels" not in frame:
        raise AnnotationError(train_csv, None, "a training file needs a Labels column (ImageID,Labels,Caption)")
    if args.limit:
        frame = frame.iloc[: args.limit].reset_index(drop=True)
    if frame.empty:
        raise UsageError(f"{train_csv} has no data rows, only its header")
    labels = sorted({label for row in frame["Labels"] for label in row})
    if len(labels) < 2:  # its validation crashed in scikit-learn's samples F1, after a whole epoch
        raise UsageError(f"{train_csv}: " + (f"every row has the one label {labels[0]}" if labels else "no labels")
                         + ": there is nothing to tell apart (give rows with at least two different labels)")
    if not args.no_image:
        if not image_dir.is_dir():
            raise UsageError(f"the image folder {image_dir} does not exist: give --image-dir (the folder of "
                             f"{train_csv}'s images), or --no-image to train on the captions alone")
        # with --skip-bad-images it trained on nothing and exported an untrained model
        if not any((image_dir / image_id).is_file() for image_id in frame["ImageID"]):
            raise UsageError(f"none of the {len(frame)} images of {train_csv} is in {image_dir} (e.g. "
                             f"{image_dir / frame['ImageID'].iloc[0]}): give --image-dir (the folder of its images)")
    return frame, image_dir, names if names.is_file() else None


def build_model_config(args: argparse.Namespace, codec: LabelCodec, tokenizer: Any,
                       frame: pd.DataFrame) -> ModelConfig:
    return ModelConfig(
        num_labels=codec.num_labels,
        image_encoder=None if args.no_image else args.encoder,
        image_size=args.image_size,
        image_crop=getattr(args, "image_crop", "center"),
        image_attention=getattr(args, "image_attention", 0.0),
        image_attention_temperature=getattr(args, "image_attention_temperature", 1.0),
        vocab_size=None if args.no_caption else tokenizer.get_vocab_size(),
        pad_id=PAD_ID,
        word_dim=args.word_dim,
        caption_hidden=args.caption_hidden,
        caption_layers=args.caption_layers,
        caption_embed_dropout=getattr(args, "caption_embed_dropout", 0.0),
        caption_word_skip=getattr(args, "caption_word_skip", False),
        max_caption_length=args.max_caption_length,
        caption_bigram_buckets=getattr(args, "caption_bigram_buckets", 0),
        caption_word_dropout=getattr(args, "caption_word_dropout", 0.0),
        use_decoder=not args.no_decoder,
        max_labels=int(frame["Labels"].map(len).max()),
        beam_width=args.beam_width,
        dropout=args.dropout,
        fusion_hidden=getattr(args, "fusion_hidden", 0),
        modality_dropout=getattr(args, "modality_dropout", 0.0),
        combine=args.combine,
        decoder_weight=ModelConfig.decoder_weight if getattr(args, "decoder_weight", None) is None
        else args.decoder_weight,
    )


def make_loaders(args: argparse.Namespace, config: ModelConfig, frames: tuple[pd.DataFrame, pd.DataFrame],
                 image_dir: Path, codec: LabelCodec, tokenizer: Any,
                 features: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 num_processes: int = 1, image_cache: Any = None, device_augment: bool = False,
                 encoded_images: bool = False) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders; with ``features`` (cached pooled features or feature maps of every row of
    the full frame, see `features.cached_features`) the samples carry those instead of images. With ``image_cache``
    (a `data.ImageCache` built by `data.build_model_image_cache`) images are read from it as uint8 and preprocessed
    by `images.BatchImageTransform` in the loader: the evaluation transform exactly, timm's training augmentation
    (random resized crop, flip, colour jitter) on the cached square. With ``device_augment`` the training loader
    leaves the cached uint8 images as they are, for `train_one_epoch`'s ``batch_transform`` to augment on the device.
    With ``encoded_images`` both loaders only read the image files, for `data.decode_images` to decode where the
    model runs.

    With several processes the training loader drops each epoch's last incomplete round of batches (a different one
    every epoch, as the order is reshuffled): Accelerate would otherwise fill it up with samples from the start of the
    epoch, training them twice and on two processes. Validation keeps every row; `collect_predictions` counts each
    once.
    """
    loaders = []
    for frame, training in zip(frames, (True, False)):
        with_images = config.use_image and features is None
        cache = image_cache if with_images else None
        encoded = with_images and encoded_images
        on_device = training and device_augment and cache is not None
        if on_device or encoded:
            transform = None  # uint8 [S, S, 3] as cached; augmented batched on the device
        elif cache is not None:
            transform = BatchImageTransform(config.image_encoder, config.image_size, training, channels_last=False)
        elif with_images:
            transform = build_transform(config.image_encoder, config.image_size, training, crop=config.image_crop)
        else:
            transform = None
        dataset = ImageCaptionDataset(frame, image_dir if with_images else None, codec, tokenizer, transform,
                                      skip_bad_images=args.skip_bad_images,
                                      max_caption_length=config.max_caption_length, image_cache=cache,
                                      encoded_images=encoded)
        if with_images and not args.skip_bad_images:
            dataset.check_images()  # fail fast, naming the file and row, before any training
        if features is not None:
            dataset = FeatureDataset(dataset, *features, rows=frame["_row"], flip=training)
        # augmented in the workers: images transformed there, or cached maps (flipped)
        augmenting = training and ((with_images and not on_device and not encoded)
                                   or (features is not None and features[0].ndim == 4))
        if augmenting:  # augmentation as a function of (seed, epoch, row): reproducible and resumable
            dataset = SeededAugmentation(dataset, args.seed)
        loaders.append(DataLoader(
            dataset, batch_size=args.batch_size, shuffle=training, num_workers=args.workers,
            collate_fn=Collator(pad_id=PAD_ID), pin_memory=torch.cuda.is_available(),
            # persistent workers would keep a stale copy of the dataset's epoch
            persistent_workers=args.workers > 0 and not augmenting, drop_last=training and num_processes > 1,
            generator=torch.Generator().manual_seed(args.seed),
            worker_init_fn=bounded_heap_worker_init))  # workers' memory stays flat (see data.py)
    if len(loaders[0]) < num_processes:
        raise ValueError(f"{len(frames[0])} training rows cannot give each of {num_processes} processes a full batch "
                         f"of {args.batch_size}: lower --batch-size")
    return loaders[0], loaders[1]


@contextlib.contextmanager
def resume_hint_on_image_error(run_dir: Path, processes: int) -> Iterator[None]:
    """An unreadable image that stops training (read in this process or in a loader worker) is followed by the
    command that continues the run without it, when the run has a checkpoint to continue from."""
    try:
        yield
    except (ImageLoadError, RuntimeError) as err:
        image_error = isinstance(err, ImageLoadError) or worker_error_name(err) == ImageLoadError.__name__
        if image_error and CheckpointManager.latest(run_dir) is not None:
            command = resume_command(run_dir, processes, "--skip-bad-images")
            # logged by the process that read the image, which need not be the main one
            logger.warning(f"stopped by an unreadable image; the run's complete checkpoints are kept: `{command}` "
                           "continues from the last one without it (or fix the file and resume without the flag)")
        raise


def resume_command(run_dir: str | Path, processes: int, *flags: str) -> str:
    """The command that continues the run in ``run_dir``: under ``accelerate launch`` with the run's number of
    processes when it has several (a plain `python train.py --resume` is refused for it). A run folder reached through
    ``runs/latest`` is named by its own name, as the next run moves the link."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        run_dir = run_dir.parent / os.readlink(run_dir)
    command = " ".join(["train.py --resume", str(run_dir), *flags])
    return f"accelerate launch --num_processes {processes} ... {command}" if processes > 1 else f"python {command}"


_THIS_RUN: dict[str, Any] = {}  # this process's run folder and number of processes, once known (`interrupt_hint`)


def interrupt_hint(resume: Optional[str]) -> str:
    """What train.py prints when it is interrupted: how to continue the run (``resume``: what ``--resume`` named,
    until `main` knows the run folder), or that there is nothing to continue."""
    run_dir = _THIS_RUN.get("run_dir")
    if run_dir is None and not resume:
        return "the run stopped before it was set up: nothing to resume"
    if run_dir is not None and CheckpointManager.latest(run_dir) is None:
        return "the run stopped before its first checkpoint: nothing to resume (run the command again to start over)"
    command = resume_command(run_dir or resume, _THIS_RUN.get("processes", 1))
    return f"the run's complete checkpoints are kept; `{command}` continues from the last one"


def verify_images(frame: pd.DataFrame, image_dir: Path, workers: int, state: PartialState,
                  resuming: bool = False, off_switch: Optional[str] = None) -> None:
    """Decode every image a run will read (``frame``: its rows, or every row where a cache holds them all), once,
    before it sets up and trains or predicts (`ImageCaptionDataset.check_images`): a corrupt file stops the run now,
    with every bad row listed, instead of when the loader or a cache build reaches the first one. With several
    processes (``state``: a `PartialState` or an `Accelerator`) each decodes its share of the rows, and every process
    stops with the same list. ``off_switch``: the flag that skips the check, named in the log line."""
    start = time.perf_counter()
    if "_row" not in frame:  # each process's share keeps the rows of the whole file, for the messages
        frame = frame.assign(_row=np.arange(len(frame)))
    share = frame.iloc[state.process_index::state.num_processes]
    bad = ImageCaptionDataset(share, image_dir).check_images(strict=False, decode=True, workers=max(1, workers),
                                                             progress=state.is_local_main_process)
    if state.num_processes > 1:
        bad = sorted(gather_object(bad))
    if bad:  # removing rows from a started run would change its split under it
        raise unreadable_images_error(image_dir, bad, advice="fix those files, or resume with --skip-bad-images to "
                                      "skip them" if resuming else None)
    if state.is_main_process:
        logger.info(f"images: all {len(frame)} decode ({time.perf_counter() - start:.1f} s to check"
                    + (f", a share on each of {state.num_processes} processes" if state.num_processes > 1 else "")
                    + (f"; {off_switch} skips this" if off_switch else "") + ")")


def trivial_baseline(train_frame: pd.DataFrame, val_targets: np.ndarray, codec: LabelCodec) -> float:
    """Samples-F1 of always answering the labels that are on at least half the training images (at least one)."""
    freq = np.stack([codec.encode(labels) for labels in train_frame["Labels"]]).mean(axis=0)
    pred = binarize(np.tile(freq, (len(val_targets), 1)), 0.5)
    return float(samples_f1(pred, val_targets).mean())


def epoch_log_values(val_metrics: dict[str, dict[str, Any]], terms: dict[str, float],
                     codec: LabelCodec) -> dict[str, float]:
    """Scalars logged after each epoch: the mean training loss terms and, per output (each branch, fused, decoder,
    final), the validation samples/micro/macro F1, mAP and per-class F1 (``val/<output>/per_class_f1/<class>``)."""
    values = {f"train_epoch/{k}": v for k, v in terms.items()}
    for out, m in val_metrics.items():
        values |= {f"val/{out}/{k}": v for k, v in m.items() if not k.startswith("per_class")}
        values |= {f"val/{out}/per_class_f1/{name}": f1 for name, f1 in zip(codec.names, m["per_class_f1"])}
    return values


def param_checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


# How long a process waits in a collective (a barrier) before the run is aborted: while the main process builds a
# feature or image cache, the others wait at a barrier, and NCCL's default (10 minutes) ends a run whose cache takes
# longer (a large dataset; feature maps on a slow disk). A process that really hangs is found this much later.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise here
    # Accelerator() reads ACCELERATE_USE_CPU but a bare PartialState() does not: without it a CPU launch of N
    # processes (gloo) would come up as N separate single-process runs.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=COLLECTIVE_TIMEOUT)
    check_launch(state)
    _THIS_RUN["processes"] = state.num_processes
    checkpoint: Optional[Path] = None
    if args.resume:
        args, checkpoint = restore_args(args, state)
    check_output_dir(args, resuming=checkpoint is not None)
    # The data first: a malformed CSV or a bad image stops the run before it leaves an empty run folder behind.
    frame, image_dir, names_csv = load_frames(args, state)
    frame["_row"] = np.arange(len(frame))  # position in the full frame, for cached features
    if getattr(args, "split_seed", None) is None:  # resolved here, so that the run's saved arguments name it
        args.split_seed = args.seed
    if getattr(args, "data_seed", None) is None:
        # Accelerate shuffles epoch e with data_seed + e: derived, so that the run of --seed s + 1 does not see in
        # each epoch the order of the one before in the run of --seed s. Saved with the run's arguments; a run started
        # before it existed shuffled with the seed itself, and resumes so.
        args.data_seed = args.seed if checkpoint is not None else derived_seed(args.seed, 1)
    train_frame, val_frame = train_val_split(frame, args.val_fraction, args.split_seed)
    train_frame = subsample_rows(train_frame, getattr(args, "train_fraction", 1.0), args.split_seed)
    fingerprint = data_fingerprint(train_frame, val_frame)
    if checkpoint is not None:
        check_same_data(checkpoint.parent.parent, fingerprint)
    if not args.no_image and not args.skip_bad_images and getattr(args, "verify_images", None) is not False:
        caching = args.cache_features or getattr(args, "image_cache", None)  # caches hold every row of the file
        verify_images(frame if caching else pd.concat([train_frame, val_frame]).sort_values("_row"), image_dir,
                      args.workers, state, resuming=checkpoint is not None, off_switch="--no-verify-images")
    run_dir = make_run_dir(args, state, resuming=checkpoint is not None)
    _THIS_RUN["run_dir"] = run_dir
    jsonl = JSONLinesTracker(run_dir / "log.jsonl")
    trackers: list[Any] = [jsonl]
    if is_tensorboard_available():
        trackers.append("tensorboard")
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
        # non_blocking: batches go to the GPU asynchronously (the loaders pin their memory on CUDA machines)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.data_seed,
                                                  non_blocking=True),
        log_with=trackers, project_dir=str(run_dir))
    accelerator.init_trackers("tensorboard", config={k: v for k, v in vars(args).items()
                                                     if isinstance(v, (int, float, str, bool))})
    # The precision in effect: --mixed-precision, else the launcher's (`accelerate launch --mixed_precision`, which
    # Accelerate reads when given none), saved with the run so that a resume keeps it under any launcher
    args.mixed_precision = accelerator.mixed_precision
    set_seed(args.seed)
    log = logger.info if accelerator.is_main_process else (lambda *a, **k: None)
    precision = precision_warning(accelerator.mixed_precision, accelerator.device)
    if precision and accelerator.is_main_process:
        logger.warning(precision)

    # Label codec and caption vocabulary (saved with the run and reused on resume).
    if checkpoint is not None:
        codec = LabelCodec.load(run_dir / "labels.json")
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    else:
        names = LabelCodec.load_names(names_csv) if names_csv else None
        codec = LabelCodec.from_labels(frame["Labels"], names=names)
        unseen = sorted(set(codec.label_ids) - {label for labels in train_frame["Labels"] for label in labels})
        if unseen and accelerator.is_main_process:
            logger.warning(f"label(s) {' '.join(map(str, unseen))} occur only in the validation rows: the model "
                           "never trains on them")
        tokenizer = train_caption_tokenizer(train_frame["Caption"], min_frequency=args.min_word_freq)
        if not args.no_caption and tokenizer.get_vocab_size() <= 2 and accelerator.is_main_process:
            logger.warning("the caption vocabulary is empty (" + (
                "every training caption is empty" if not train_frame["Caption"].fillna("").str.strip().any() else
                f"no word occurs {args.min_word_freq} times: lower --min-word-freq" if args.min_word_freq > 1 else
                "no caption has a word") + "): the caption branch sees "
                "nothing but unknown words" + (" and can learn only how often each label occurs" if args.no_image
                                               else " (--no-caption leaves it out)"))
    config = build_model_config(args, codec, tokenizer, frame)
    if accelerator.is_main_process:
        if checkpoint is None:  # a resumed run reads them (every process, above): never rewritten under its readers
            codec.save(run_dir / "labels.json")
            tokenizer.save(str(run_dir / "tokenizer.json"))
        save_json({"args": vars(args), "model": config.to_dict(), "num_processes": accelerator.num_processes,
                   "train_rows": len(train_frame), "val_rows": len(val_frame), "data_fingerprint": fingerprint},
                  run_dir / "run_config.json")
    log(f"run folder {run_dir}: {len(train_frame)} training and {len(val_frame)} validation rows, "
        f"{codec.num_labels} classes, vocabulary {tokenizer.get_vocab_size()}, {accelerator.num_processes} process(es)")

    # Model, loss, optimisation.
    # A resumed run gets its weights from the checkpoint: the image encoder's at once, for cached features, which are
    # keyed by the weights they are computed with (the pretrained ones, kept frozen in the checkpoint; resolving the
    # pretrained weights again might find others, or none, by then), and all of them with the optimizer state below.
    model = MultimodalClassifier(config, pretrained=args.pretrained_file or args.pretrained if checkpoint is None
                                 else False)
    if checkpoint is not None and args.cache_features and model.image_encoder is not None:
        encoder = {}
        for key, value in load_file(str(checkpoint / "model.safetensors")).items():
            for wrapper in ("module.", "_orig_mod."):  # Accelerate's own format kept DDP's and compile's prefixes
                key = key.removeprefix(wrapper)
            if key.startswith("image_encoder."):
                encoder[key.removeprefix("image_encoder.")] = value
        if not encoder:
            raise CheckpointError(f"{checkpoint / 'model.safetensors'} holds no image encoder weights")
        model.image_encoder.load_state_dict(encoder)
    if model.image_encoder is not None:
        source = model.image_encoder.pretrained_source if checkpoint is None else f"the checkpoint {checkpoint}"
        log(f"image encoder {config.image_encoder}: weights from {source}")
    if args.glove and config.use_caption and checkpoint is None:
        hits = model.caption_encoder.load_word_vectors(args.glove, tokenizer.get_vocab())
        log(f"word vectors: {hits} of {tokenizer.get_vocab_size()} words initialised from {args.glove}")
    features = None
    frozen: list[torch.nn.Module] = []
    tail = getattr(args, "train_tail_stages", 0)
    if tail and model.image_encoder is not None:
        stages = len(model.image_encoder._stages())
        if tail > stages:
            raise UsageError(f"--train-tail-stages {tail}: {config.image_encoder} has {stages} stages (to fine-tune "
                             "the whole encoder, leave out --cache-features)")
    if args.cache_features and model.image_encoder is not None:
        with accelerator.main_process_first():  # the main process computes and writes, the others read the cache
            features = cached_features(model.image_encoder, frame, image_dir, config.image_size, args.cache_features,
                                       batch_size=2 * args.batch_size, workers=args.workers,
                                       device=accelerator.device, skip_bad_images=args.skip_bad_images,
                                       tail_stages=tail or None, crop=config.image_crop,
                                       retry_unreadable=accelerator.is_main_process)
        if tail:  # fine-tune the top stages on cached feature maps; everything below stays frozen
            frozen = model.image_encoder.freeze_below_tail(tail)
            model.tail_stages = tail
        else:
            args.freeze_image_encoder = True
    if args.freeze_image_encoder and model.image_encoder is not None:
        model.image_encoder.requires_grad_(False)
        frozen = model.image_encoder.frozen_modules()
    if getattr(args, "channels_last", False) and model.image_encoder is not None:
        model.image_encoder.to(memory_format=torch.channels_last)
    criterion = JointLoss(LossConfig(decoder_weight=args.decoder_loss_weight, focal_gamma=args.focal_gamma,
                                     asl_gamma_neg=getattr(args, "asl_gamma_neg", 0.0),
                                     asl_clip=getattr(args, "asl_clip", LossConfig.asl_clip)))
    image_cache = None
    if getattr(args, "image_cache", None) and model.image_encoder is not None and features is None:
        with accelerator.main_process_first():  # the main process builds the cache, the others then reuse it
            image_cache = build_model_image_cache(config, frame["ImageID"], image_dir, args.image_cache,
                                                  workers=args.workers, skip_bad_images=args.skip_bad_images,
                                                  retry_unreadable=accelerator.is_main_process)
    decode_on_device = getattr(args, "decode_on_device", False) and model.image_encoder is not None \
        and features is None
    device_augment = decode_on_device or image_cache is not None and (
        args.device_augment if getattr(args, "device_augment", None) is not None
        else accelerator.device.type != "cpu")  # default: on a GPU, not on a CPU (whose cores run the model)
    batch_transform = None
    prepare_train = prepare_val = None
    if decode_on_device:  # files read by the workers, decoded and resized here, then as from the uint8 cache
        decoder = EncodedImageDecoder.for_model(config.image_encoder, config.image_size, config.image_crop,
                                                device=accelerator.device)
        val_transform = BatchImageTransform(config.image_encoder, config.image_size, training=False,
                                            channels_last=getattr(args, "channels_last", False)
                                            ).to(accelerator.device)
        prepare_train = functools.partial(decode_images, decoder=decoder, skip_bad_images=args.skip_bad_images)
        prepare_val = functools.partial(decode_images, decoder=decoder, skip_bad_images=args.skip_bad_images,
                                        transform=val_transform)
        log(f"images: decoded batched on {accelerator.device}")
    if device_augment:
        batch_transform = BatchImageTransform(config.image_encoder, config.image_size, training=True,
                                              channels_last=getattr(args, "channels_last", False)
                                              ).to(accelerator.device)
    if image_cache is not None:
        log("training augmentation: " + (f"batched on {accelerator.device}" if device_augment
                                         else "per image in the loader workers"))
    train_loader, val_loader = make_loaders(args, config, (train_frame, val_frame), image_dir, codec, tokenizer,
                                            features, num_processes=accelerator.num_processes,
                                            image_cache=image_cache, device_augment=device_augment,
                                            encoded_images=decode_on_device)
    optimizer = build_optimizer(model, args.lr, args.backbone_lr, args.weight_decay)
    # The weight average is copied from the bare model (a prepared one may carry a wrapped forward), then moved along.
    ema = build_ema(model, args.ema_decay) if getattr(args, "ema_decay", 0.0) else None
    if getattr(args, "compile", False) and model.image_encoder is not None and features is None:
        model.image_encoder.compile_forward()  # after the average's copy, which stays eager
        log("image encoder: compiled with torch.compile (the first training and validation batches wait for it)")
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if ema is not None:
        ema.module.to(accelerator.device)
        log(f"weight average: decay warming up to {args.ema_decay}; validated and exported in place of the weights")
    steps_per_epoch = -(-len(train_loader) // args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 20)
    # Accelerate steps a prepared scheduler once per process per optimizer step: count in those units.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps * accelerator.num_processes, warmup * accelerator.num_processes))
    scheduler = accelerator.prepare(scheduler)

    link_latest(args, run_dir, accelerator.state)
    checkpoints = CheckpointManager(accelerator, run_dir, keep=args.keep_checkpoints, ema=ema)
    progress = Progress()

    def training_left() -> bool:  # epochs to run, and steps before --max-steps
        return progress.epoch < args.epochs and not (args.max_steps and progress.step >= args.max_steps)

    if checkpoint is not None:
        progress = checkpoints.load(checkpoint)
        log(f"resumed from {checkpoint}: epoch {progress.epoch}, batch {progress.batches_done}, step {progress.step}")
        if accelerator.is_main_process:  # what the run logged after this checkpoint is about to be logged again
            # ... unless the run trains no more: stopped by --max-steps in mid-epoch, its validation line stays
            dropped = jsonl.truncate_after(progress.step,
                                           progress.epoch if progress.batches_done and training_left() else None)
            if dropped:
                log(f"log.jsonl: dropped {dropped} line(s) logged after step {progress.step} by the interrupted run")
    kill_at = int(os.environ.get(KILL_AFTER_CHECKPOINT_ENV, "0"))

    def on_checkpoint(p: Progress) -> None:
        if kill_at and p.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    bad_images: list[str] = []
    seen_ids: list[list[str]] = []  # per epoch (of this call), the image ids this process trained on, in order
    val_metrics: dict[str, Any] = {}
    predictions: Optional[dict[str, np.ndarray]] = None  # of the validation rows, by the latest weights (or average)
    raw_metrics: dict[str, Any] = {}  # with a weight average: the trained weights' own metrics, for comparison
    evaluated = model if ema is None else ema.module  # what is validated and exported
    val_bad = bad_images if config.use_image else None
    progress.start_clock()
    with resume_hint_on_image_error(run_dir, accelerator.num_processes):
        while training_left():
            train_loader.set_epoch(progress.epoch)
            if isinstance(train_loader.dataset, SeededAugmentation):
                train_loader.dataset.set_epoch(progress.epoch)
            loader = train_loader
            if progress.batches_done:
                loader = accelerator.skip_first_batches(train_loader, progress.batches_done)
                loader.set_epoch(progress.epoch)
            seen_ids.append([])
            terms = train_one_epoch(
                model, loader, criterion, optimizer, scheduler, accelerator, progress,
                total_batches=len(train_loader), max_steps=args.max_steps, log_every=args.log_every,
                checkpoint_every=args.checkpoint_every, checkpoints=checkpoints, on_checkpoint=on_checkpoint,
                bad_images=bad_images, use_image=config.use_image, frozen=frozen, seen_ids=seen_ids[-1],
                batch_transform=batch_transform, augment_seed=args.seed, prepare=prepare_train, ema=ema)
            epoch_done = progress.batches_done >= len(train_loader)
            if len(val_frame):
                predictions = collect_predictions(evaluated, val_loader, accelerator, bad_images=val_bad,
                                                  prepare=prepare_val)
                if not predicted_rows(predictions["final"]).any():
                    raise UsageError(f"none of the {len(val_frame)} validation images can be read (skipped: "
                                     f"--skip-bad-images), and the model needs them: there is nothing to validate on")
                val_metrics = evaluate(predictions)
                if ema is not None:
                    raw_metrics = evaluate(collect_predictions(model, val_loader, accelerator, prepare=prepare_val))
            # Logged with or without a validation split (--val-fraction 0 still gets its per-epoch losses).
            values = epoch_log_values(val_metrics, terms, codec)
            values |= {f"val_without_ema/{out}/{k}": v for out, m in raw_metrics.items() for k, v in m.items()
                       if not k.startswith("per_class")}
            accelerator.log(values | {"epoch": progress.epoch}, step=progress.step)
            log(f"epoch {progress.epoch}: loss {terms.get('loss', float('nan')):.4f}"
                + ("  val samples-F1 " + "  ".join(f"{out} {m['samples_f1']:.4f}" for out, m in val_metrics.items())
                   if val_metrics else "")
                + (f"  (without the average: final {raw_metrics['final']['samples_f1']:.4f})" if raw_metrics else ""))
            if epoch_done:
                progress.next_epoch()
                checkpoints.save(progress)
    # Export: thresholds, the model, metrics and charts; only the main process writes. The training time is that of
    # every session of a resumed run (`Progress.train_seconds`); the data order that of this call's epochs.
    summary: dict[str, Any] = {"train_seconds": progress.clock(), "steps": progress.step}
    threshold = getattr(args, "threshold", None)  # absent from the saved arguments of runs before it existed
    thresholds = None if threshold is None else [float(threshold)] * codec.num_labels
    if len(val_frame):
        if predictions is None:  # no training in this call (a finished run resumed)
            predictions = collect_predictions(evaluated, val_loader, accelerator, bad_images=val_bad,
                                              prepare=prepare_val)
        # Scored: the rows the final output predicted (an unreadable image of a model without a caption branch is
        # not predicted, as predict.py leaves it without labels).
        scored = predicted_rows(predictions["final"])
        probs, targets = predictions["final"][scored], predictions["targets"][scored]
        final = compute_metrics(probs, targets, 0.5)
        summary.update(num_val_samples=int(len(targets)), val_index=predictions["index"].astype(int).tolist(),
                       # which rows of the training CSV were held out (0-based data rows): the split itself
                       val_source_rows=val_frame["_row"].astype(int).tolist(),
                       trivial_samples_f1=trivial_baseline(train_frame, targets, codec),
                       val=evaluate(predictions))
        if not scored.all():
            summary["val_rows_not_predicted"] = int((~scored).sum())
        if raw_metrics:
            summary["val_without_ema"] = raw_metrics
        if threshold is not None:
            summary["val_at_threshold"] = compute_metrics(probs, targets, thresholds)
        if args.tune_thresholds:
            tuned, report = select_thresholds(probs, targets)
            thresholds = None if tuned is None else tuned.tolist()
            summary["val_tuned"] = report["tuned"]  # tuned and scored on the same rows: optimistic
            summary["val_tuned_crossfit"] = report["tuned_heldout"]  # honest
            summary["val_single_threshold"] = report["single_threshold"]
            summary["val_single_threshold_crossfit"] = report["single_heldout"]  # honest
            summary["threshold_mode"] = report["mode"]
            summary["thresholds_stored"] = report["kept"]
        message = (f"validation samples-F1 {final['samples_f1']:.4f} (trivial baseline: always the most frequent "
                   f"labels, {summary['trivial_samples_f1']:.4f})")
        if not scored.all():
            message += (f"; {int((~scored).sum())} of {len(scored)} validation rows not scored: their images are "
                        "unreadable, and the model needs them")
        if threshold is not None:
            message += f"; at the stored threshold {threshold:g}: {summary['val_at_threshold']['samples_f1']:.4f}"
        if args.tune_thresholds:
            chosen = {"per_class": "the per-class thresholds are stored with the model",
                      "single": f"the single threshold {summary['val_single_threshold']:g} is stored with the model",
                      "0.5": "the model predicts at 0.5"}[report["mode"]]
            message += (f"; with per-class thresholds {summary['val_tuned_crossfit']['samples_f1']:.4f}, with one "
                        f"threshold for all classes {summary['val_single_threshold_crossfit']['samples_f1']:.4f} "
                        f"(each tuned on held-out folds): {chosen}")
        log(message)
    summary["param_checksum_per_rank"] = accelerator.gather(
        torch.tensor([param_checksum(model)], dtype=torch.float64, device=accelerator.device)).tolist()
    seen_per_rank = gather_object([seen_ids])  # plain gathers: these are per-rank records, not metrics to dedupe
    bad_all = sorted(set(gather_object(bad_images)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        core = accelerator.unwrap_model(model) if ema is None else ema.module
        export_dir = run_dir / "model"
        core.save_pretrained(export_dir, codec=codec, tokenizer=tokenizer if config.use_caption else None,
                             thresholds=thresholds)
        summary["data_order_per_rank"] = seen_per_rank
        if bad_all:
            summary["bad_images"] = bad_all
            log(f"skipped {len(bad_all)} unreadable image(s): {', '.join(bad_all[:20])}"
                + (" ..." if len(bad_all) > 20 else ""))
        save_json(summary, run_dir / "metrics.json")
        if len(val_frame):  # every output's validation probabilities, for offline analysis of combination rules
            np.savez_compressed(run_dir / "val_predictions.npz", **predictions)
        if not args.no_plots:
            from .plots import plot_per_class_f1, plot_training_curves
            plot_training_curves(run_dir / "log.jsonl", run_dir / "training_curves.png")
            if val_metrics:
                plot_per_class_f1({out: m["per_class_f1"] for out, m in summary["val"].items()},
                                  list(codec.names), run_dir / "per_class_f1.png")
        log(f"exported {export_dir}")
    accelerator.end_training()
    return 0
