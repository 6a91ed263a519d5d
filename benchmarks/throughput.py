#!/usr/bin/env python3
"""Training and inference throughput of the joint model against the bare model, and of the data pipeline.

One run measures, on the same images, batch size and resolution (every rate in images/s, warm-up excluded):

- training: the image encoder alone (a timm model + BCE + the same AdamW: the bare model) against the joint model
  (image + caption + label decoder + joint loss), both in the same plain loop, against the joint model under
  `engine.train_one_epoch` (the code `train.py` runs), and end to end from the JPEGs on disk and from the uint8 cache;
  beside them the joint model with only its image branch on, which separates the wrapper's cost from the caption
  LSTM's and the decoder's;
- inference: the bare forward (image encoder alone; the joint model's ``predict_proba``) on batches already in memory
  against `inference.predict_to_csv` end to end (read JPEGs, transform, model, write the CSV), and from the cache;
- the data loader alone (images/s, and per worker) and, as with/without ratios in the same run, the speed options:
  JPEG draft decoding, the uint8 image cache, channels_last, torch.compile, persistent workers, the caption LSTM on
  padded against packed captions, fused against for-loop AdamW;
- with ``--sections memory``: peak memory of ``predict.py`` over a few hundred and a few thousand images, and of
  ``train.py`` at its defaults (demo data), as subprocesses with their DataLoader workers;
- with ``--sections checkpoint``: what a checkpoint costs (`engine.CheckpointManager`: safetensors + JSON, a SHA-256
  manifest, fsync) against the same state written without the manifest and fsync and against Accelerate's own
  ``save_state``, in training steps of the joint model, and what the check before a resume costs against the load.

    python benchmarks/throughput.py                                   # CPU: COMP5329, 224 and 128 px
    python benchmarks/throughput.py --sections memory                 # peak RSS of predict.py and train.py
    python benchmarks/throughput.py --sections checkpoint --sizes 224  # a checkpoint's cost, in training steps
    python benchmarks/throughput.py --smoke --output /tmp/smoke.json  # seconds, demo data: keeps the script working
    bash benchmarks/gpu.sh                                            # one GPU: bf16/fp16, channels_last, cache

Results go to ``--output`` (JSON) with the machine (CPU model, cores, torch version, load average at every
measurement, GPU). The machine may be shared: the load average is recorded beside every number. Paired
measurements (the ratios) alternate their order over ``--rounds`` rounds so that load drifting during the run hits
both sides.
"""
from __future__ import annotations

import os

# With few cores shared by DataLoader workers and torch's threads, spinning OpenMP threads slow everything down
# (measured: the PIL->tensor transform 10x slower). Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterable, Iterator, Optional  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from multimodal.annotations import read_annotations  # noqa: E402
from multimodal.config import LossConfig, ModelConfig, save_json  # noqa: E402
from multimodal.data import Collator, ImageCaptionDataset, build_image_cache, decode_images  # noqa: E402
from multimodal.engine import (CheckpointManager, Progress, adamw, build_optimizer, load_training_state,  # noqa
                               lr_lambda, model_inputs, save_training_state, train_one_epoch)
from multimodal.images import (BatchImageTransform, EncodedImageDecoder, build_transform, draft_size_for,  # noqa
                               eval_resize_size, load_image, resolve_image_config)
from multimodal.inference import predict_to_csv  # noqa: E402
from multimodal.labels import LabelCodec  # noqa: E402
from multimodal.losses import JointLoss  # noqa: E402
from multimodal.model import MultimodalClassifier  # noqa: E402
from multimodal.text import PAD_ID, train_caption_tokenizer  # noqa: E402

SECTIONS = ("train", "infer", "loader", "options", "draft", "memory", "checkpoint")


# ---------------------------------------------------------------------------------------------------------------------
# Machine and timing helpers


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "platform": platform.platform(), "hostname": platform.node(), "device": str(device),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_start": list(os.getloadavg())}
    with contextlib.suppress(ImportError):
        import PIL
        from PIL import features
        info["pillow"] = PIL.__version__
        info["libjpeg_turbo"] = bool(features.check_feature("libjpeg_turbo"))
    with contextlib.suppress(OSError, ValueError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Timed:
    """Iterates ``batches``; times from the moment the first ``warmup`` batches have been consumed (the consumer asks
    for the next one) to the end, and counts the images of the timed batches. ``sync`` waits for the device.
    ``first_batch_seconds``: from asking for an iterator to the first batch (a DataLoader's start-up)."""

    def __init__(self, batches: Iterable[dict[str, Any]], warmup: int, sync: Callable[[], None],
                 length: Optional[int] = None) -> None:
        self.batches, self.warmup, self.sync = batches, warmup, sync
        self.length = length if length is not None else len(batches)  # type: ignore[arg-type]
        self.images, self.seconds, self.t0 = 0, float("nan"), None
        self.first_batch_seconds = float("nan")

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = time.perf_counter()
        for i, batch in enumerate(self.batches):
            if i == 0:
                self.first_batch_seconds = time.perf_counter() - start
            if i == self.warmup:
                self.sync()
                self.t0 = time.perf_counter()
            if i >= self.warmup:
                self.images += len(batch["image_id"])
            yield batch
        self.sync()
        if self.t0 is not None:
            self.seconds = time.perf_counter() - self.t0

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.images and self.seconds > 0 else float("nan")


def measure(name: str, fn: Callable[[], tuple[int, float]]) -> dict[str, Any]:
    """Runs ``fn`` -> (images, seconds) and records the rate with the load average around it."""
    before = loadavg()
    images, seconds = fn()
    rate = images / seconds if seconds > 0 else float("nan")
    result = {"images": images, "seconds": round(seconds, 4), "images_per_s": round(rate, 3),
              "loadavg_before": before, "loadavg_after": loadavg()}
    print(f"  {name:<38s} {rate:10.1f} img/s  ({images} images, {seconds:.2f} s, load {before[0]:.1f})", flush=True)
    return result


def paired(names: tuple[str, ...], fns: tuple[Callable[[], tuple[int, float]], ...],
           rounds: int) -> dict[str, dict[str, Any]]:
    """Runs each measurement ``rounds`` times, alternating the order, and pools images and seconds per name."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        order = list(range(len(names)))
        if r % 2:
            order.reverse()
        for i in order:
            runs[names[i]].append(measure(names[i] + (f" [round {r + 1}]" if rounds > 1 else ""), fns[i]))
    pooled = {}
    for n, rs in runs.items():
        images, seconds = sum(x["images"] for x in rs), sum(x["seconds"] for x in rs)
        pooled[n] = {"images_per_s": round(images / seconds, 3) if seconds > 0 else float("nan"), "images": images,
                     "seconds": round(seconds, 4), "rounds": rs}
    return pooled


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return round(a["images_per_s"] / b["images_per_s"], 4) if b["images_per_s"] else float("nan")


def median_paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Speed of ``a`` over ``b`` as the median over batches of (``b``'s step time / ``a``'s) on the same batch, from
    interleaved measurements: a few steps slowed by another process on a shared machine move it less than they
    move the ratio of the totals (`ratio`), which stays the headline figure."""
    pairs = [tb / ta for ta, tb in zip(a.get("step_seconds", []), b.get("step_seconds", [])) if ta > 0]
    return round(float(np.median(pairs)), 4) if pairs else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Data and models


class Setup:
    """Everything shared by the measurements at one resolution: rows, codec, tokenizer, model config, batches."""

    def __init__(self, args: argparse.Namespace, frame: pd.DataFrame, image_dir: Path, size: int,
                 accelerator: Accelerator) -> None:
        self.args, self.frame, self.image_dir, self.size, self.acc = args, frame, image_dir, size, accelerator
        self.device = accelerator.device
        self.codec = LabelCodec.from_labels(frame["Labels"])
        self.tokenizer = train_caption_tokenizer(frame["Caption"])
        self.config = ModelConfig(num_labels=self.codec.num_labels, image_encoder=args.encoder, image_size=size,
                                  vocab_size=self.tokenizer.get_vocab_size(), pad_id=PAD_ID,
                                  caption_hidden=args.caption_hidden,
                                  max_labels=int(frame["Labels"].map(len).max()))
        self.image_config = resolve_image_config(args.encoder, size)
        self.cache = None
        self.cache_info: dict[str, Any] = {}

    def rows(self, n: int) -> pd.DataFrame:
        """The first ``n`` rows, cycling through the frame when it has fewer."""
        reps = -(-n // len(self.frame))
        return pd.concat([self.frame] * reps, ignore_index=True).iloc[:n].reset_index(drop=True)

    def dataset(self, rows: pd.DataFrame, training: bool, *, cache: bool = False, draft: Optional[int] = None,
                labelled: bool = True, encoded: bool = False) -> ImageCaptionDataset:
        """``encoded``: the samples carry the image files' bytes, for `data.decode_images` on the device."""
        transform = None if cache or encoded else build_transform(self.args.encoder, self.size, training)
        return ImageCaptionDataset(rows, self.image_dir, self.codec if labelled else None, self.tokenizer, transform,
                                   draft_size=draft, image_cache=self.cache if cache else None,
                                   encoded_images=encoded)

    def decoder(self) -> EncodedImageDecoder:
        """Decodes image files on the device into the squares of the image cache (`images.image_cache_settings`)."""
        return EncodedImageDecoder.for_model(self.args.encoder, self.size, device=self.device)

    def loader(self, dataset: ImageCaptionDataset, workers: int, shuffle: bool = False,
               persistent: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=self.args.batch_size, shuffle=shuffle, num_workers=workers,
                          collate_fn=Collator(pad_id=PAD_ID), pin_memory=self.device.type == "cuda",
                          persistent_workers=persistent and workers > 0, drop_last=True)

    def memory_batches(self, n_batches: int, training: bool) -> list[dict[str, Any]]:
        """``n_batches`` collated batches on the device: the tensors the bare measurements start from.

        At most ``--distinct-batches`` are made from the first rows (memory: 16 batches of 256 images at 224 px
        are 2.5 GB); longer measurements cycle through them.
        """
        distinct = min(n_batches, self.args.distinct_batches)
        rows = self.rows(distinct * self.args.batch_size)
        loader = self.loader(self.dataset(rows, training), self.args.workers)
        batches = []
        for batch in loader:
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if self.args.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            batches.append(batch)
        return [batches[i % len(batches)] for i in range(n_batches)]

    def ensure_cache(self) -> Any:
        """The uint8 cache of the rows used, at the evaluation resize size, built (and timed) once per resolution."""
        if self.cache is None:
            n = max(self.args.train_images, self.args.infer_images, self.args.loader_images) + \
                self.args.warmup * self.args.batch_size
            ids = self.rows(n)["ImageID"]
            resize = eval_resize_size(self.image_config)
            start = time.perf_counter()
            self.cache = build_image_cache(ids, self.image_dir, self.args.cache_dir, resize,
                                           self.image_config["interpolation"], crop=self.size,
                                           workers=self.args.cache_workers, rebuild=not self.args.reuse_cache)
            seconds = time.perf_counter() - start
            count = len(self.cache)
            self.cache_info = {"images": count, "size": resize, "build_seconds": round(seconds, 3),
                               "build_images_per_s": round(count / seconds, 1), "reused": self.cache.meta["reused"],
                               "workers": self.args.cache_workers, "bytes": count * resize * resize * 3,
                               "path": str(self.cache.path), "loadavg": loadavg()}
            print(f"  image cache: {count} images at {resize} px in {seconds:.2f} s "
                  f"({count / seconds:.0f} img/s, reused={self.cache.meta['reused']})", flush=True)
        return self.cache

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def joint_model(self, **overrides: Any) -> MultimodalClassifier:
        """The joint model at the benchmark's settings; ``overrides`` change `ModelConfig` fields (branches off)."""
        torch.manual_seed(0)
        model = MultimodalClassifier(dataclasses.replace(self.config, **overrides), pretrained=False)
        model.codec, model.tokenizer = self.codec, self.tokenizer
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.args.channels_last else model

    def encoder_model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        model = timm.create_model(self.args.encoder, pretrained=False, num_classes=self.codec.num_labels,
                                  drop_rate=self.config.image_drop_rate).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.args.channels_last else model


def maybe_compile(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    return torch.compile(model) if args.compile else model


# ---------------------------------------------------------------------------------------------------------------------
# Training


def train_encoder_alone(s: Setup, batches: list[dict[str, Any]]) -> tuple[int, float]:
    """The bare model: timm encoder with its classifier, BCE, AdamW; forward + backward + step per batch."""
    model = maybe_compile(s.encoder_model(), s.args)
    optimizer = adamw(model.parameters(), lr=1e-3)
    model, optimizer = s.acc.prepare(model, optimizer)
    model.train()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    timed = Timed(batches, s.args.warmup, s.sync)
    for batch in timed:
        loss = loss_fn(model(batch["image"]).float(), batch["targets"])
        s.acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    s.acc.free_memory()
    return timed.images, timed.seconds


def train_joint_engine(s: Setup, batches: Iterable[dict[str, Any]], length: Optional[int] = None,
                       transform: Optional[BatchImageTransform] = None,
                       decoder: Optional[EncodedImageDecoder] = None) -> tuple[int, float]:
    """The joint model under `engine.train_one_epoch` (Accelerate, gradient clipping, scheduler, logging): what
    ``train.py`` runs per step. ``batches`` may be a prepared DataLoader (end to end)."""
    model = maybe_compile(s.joint_model(), s.args)
    criterion = JointLoss(LossConfig())
    optimizer = build_optimizer(model, 1e-3, 1e-3, 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = s.acc.prepare(model, optimizer, scheduler)
    if transform is not None:
        batches = _transformed(batches, transform, s, decoder)
    timed = Timed(batches, s.args.warmup, s.sync, length=length)
    train_one_epoch(model, timed, criterion, optimizer, scheduler, s.acc, Progress(), total_batches=len(timed),
                    log_every=10 ** 9, use_image=True)
    s.acc.free_memory()
    return timed.images, timed.seconds


def _transformed(batches: Iterable[dict[str, Any]], transform: BatchImageTransform,
                 s: Setup, decoder: Optional[EncodedImageDecoder] = None) -> Iterator[dict[str, Any]]:
    """Cached uint8 batches (or, with ``decoder``, image files decoded into such batches) moved to the device and
    preprocessed there (`images.BatchImageTransform`)."""
    for batch in batches:
        batch = {k: v.to(s.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if decoder is not None:
            batch = decode_images(batch, decoder)
        batch["image"] = transform(batch["image"])
        yield batch


class PilFromCache:
    """A PIL transform applied to a cached uint8 image [S, S, 3]."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from PIL import Image
        return self.transform(Image.fromarray(image.numpy()))


def train_end_to_end(s: Setup, cache: bool, decode: bool = False) -> tuple[int, float]:
    """`train_one_epoch` over a DataLoader reading the JPEGs (or the uint8 cache) with the training transform; with
    ``decode`` the loader only reads the files, and each batch is decoded, resized and augmented on the device (what
    ``train.py --decode-on-device`` does)."""
    n = (s.args.train_batches + s.args.warmup) * s.args.batch_size
    rows = s.rows(n)
    dataset = s.dataset(rows, training=True, cache=cache, encoded=decode)
    transform = None
    if decode or cache and s.device.type == "cuda":  # uint8 batches augmented on the device (decoded there: any)
        transform = BatchImageTransform(s.args.encoder, s.size, training=True,
                                        channels_last=s.args.channels_last).to(s.device)
    elif cache:  # on a CPU: timm's PIL augmentation of the cached image, in the DataLoader workers
        dataset.transform = PilFromCache(build_transform(s.args.encoder, s.size, training=True))
    loader = s.acc.prepare(s.loader(dataset, s.args.workers, shuffle=True, persistent=True))
    result = train_joint_engine(s, loader, length=len(loader), transform=transform,
                                decoder=s.decoder() if decode else None)
    del loader
    return result


def interleaved(s: Setup, steps: dict[str, Callable[[dict[str, Any]], Any]], batches: list[dict[str, Any]],
                label: str = "interleaved") -> dict[str, Any]:
    """Runs every step on each batch in turn (order alternating batch by batch) and times each step apart, so that
    a shared machine's changing load hits all of them alike. The first ``--warmup`` batches are not timed."""
    names = list(steps)
    seconds = dict.fromkeys(names, 0.0)
    images = dict.fromkeys(names, 0)
    per_step: dict[str, list[float]] = {name: [] for name in names}
    first_call: dict[str, float] = {}
    before = loadavg()
    for i, batch in enumerate(batches):
        for name in names if i % 2 == 0 else reversed(names):
            s.sync()
            t0 = time.perf_counter()
            steps[name](batch)
            s.sync()
            if i == 0:
                first_call[name] = round(time.perf_counter() - t0, 3)
            if i >= s.args.warmup:
                elapsed = time.perf_counter() - t0
                seconds[name] += elapsed
                images[name] += len(batch["image_id"])
                per_step[name].append(elapsed)
    return _interleaved_result(names, images, seconds, before, label, first_call, per_step)


def _interleaved_result(names: Iterable[str], images: dict[str, int], seconds: dict[str, float], before: list[float],
                        label: str, first_call: Optional[dict[str, float]] = None,
                        per_step: Optional[dict[str, list[float]]] = None) -> dict[str, Any]:
    after = loadavg()
    out: dict[str, Any] = {}
    for name in names:
        rate = images[name] / seconds[name] if seconds[name] > 0 else float("nan")
        out[name] = {"images_per_s": round(rate, 3), "images": images[name], "seconds": round(seconds[name], 4),
                     "loadavg_before": before, "loadavg_after": after, "interleaved": True}
        if first_call and name in first_call:
            out[name]["first_batch_seconds"] = first_call[name]
        if per_step and per_step.get(name):
            out[name]["step_seconds"] = [round(t, 4) for t in per_step[name]]
        print(f"  {name + f' ({label})':<38s} {rate:10.1f} img/s  ({images[name]} images, "
              f"{seconds[name]:.2f} s, load {before[0]:.1f}->{after[0]:.1f})", flush=True)
    return out


def interleaved_training(s: Setup, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The encoder alone, the joint model in the same plain loop and the joint model under `train_one_epoch`,
    stepped in turn on each batch (the order alternating), so that a shared machine's changing load hits all of them
    alike. The `train_one_epoch` step is the time from handing it a batch to its asking for the next one. A fourth
    model, the joint model with its caption branch and decoder switched off (``image_branch_only``: the same encoder
    inside `MultimodalClassifier`, its heads and loss), splits the joint model's extra cost into the wrapper's and
    that of the caption LSTM and the decoder."""
    names = ("encoder_alone", "image_branch_only", "joint_plain_loop", "joint_train_one_epoch")
    seconds = dict.fromkeys(names, 0.0)
    images = dict.fromkeys(names, 0)
    per_step: dict[str, list[float]] = {name: [] for name in names}
    before = loadavg()

    encoder = s.encoder_model()
    encoder_opt = adamw(encoder.parameters(), lr=1e-3)
    joint = maybe_compile(s.joint_model(), s.args)
    joint_opt = build_optimizer(joint, 1e-3, 1e-3, 1e-4)
    image_only = maybe_compile(s.joint_model(vocab_size=None, use_decoder=False), s.args)
    image_only_opt = build_optimizer(image_only, 1e-3, 1e-3, 1e-4)
    image_only, image_only_opt = s.acc.prepare(image_only, image_only_opt)
    engine = maybe_compile(s.joint_model(), s.args)
    engine_opt = build_optimizer(engine, 1e-3, 1e-3, 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine_opt, lambda step: 1.0)
    encoder, encoder_opt, joint, joint_opt, engine, engine_opt, scheduler = s.acc.prepare(
        encoder, encoder_opt, joint, joint_opt, engine, engine_opt, scheduler)
    encoder.train()
    joint.train()
    bce = torch.nn.BCEWithLogitsLoss()
    criterion = JointLoss(LossConfig())

    def encoder_step(batch: dict[str, Any]) -> None:
        loss = bce(encoder(batch["image"]).float(), batch["targets"])
        s.acc.backward(loss)
        encoder_opt.step()
        encoder_opt.zero_grad(set_to_none=True)

    joint_step = _joint_train_step(s, joint, joint_opt)
    image_only_step = _joint_train_step(s, image_only, image_only_opt)

    def timed_step(name: str, step: Callable[[dict[str, Any]], None], batch: dict[str, Any], count: bool) -> None:
        s.sync()
        t0 = time.perf_counter()
        step(batch)
        s.sync()
        if count:
            elapsed = time.perf_counter() - t0
            seconds[name] += elapsed
            images[name] += len(batch["image_id"])
            per_step[name].append(elapsed)

    def driver() -> Iterator[dict[str, Any]]:
        for i, batch in enumerate(batches):
            count = i >= s.args.warmup
            plain = [("encoder_alone", encoder_step), ("image_branch_only", image_only_step),
                     ("joint_plain_loop", joint_step)]
            if i % 2 == 0:
                for name, step in plain:
                    timed_step(name, step, batch, count)
            s.sync()
            t0 = time.perf_counter()
            yield batch  # train_one_epoch runs its step on it
            s.sync()
            if count:
                elapsed = time.perf_counter() - t0
                seconds["joint_train_one_epoch"] += elapsed
                images["joint_train_one_epoch"] += len(batch["image_id"])
                per_step["joint_train_one_epoch"].append(elapsed)
            if i % 2 == 1:
                for name, step in reversed(plain):
                    timed_step(name, step, batch, count)

    class Batches:
        def __len__(self) -> int:
            return len(batches)

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return driver()

    train_one_epoch(engine, Batches(), criterion, engine_opt, scheduler, s.acc, Progress(),
                    total_batches=len(batches), log_every=10 ** 9, use_image=True)
    waits = {}
    if s.device.type == "cuda":  # where a step makes the host wait for the GPU (one step of each, after the timing)
        waits = {"encoder_alone": device_waits(lambda: encoder_step(batches[0])),
                 "joint_plain_loop": device_waits(lambda: joint_step(batches[0])),
                 "joint_train_one_epoch": device_waits(lambda: train_one_epoch(
                     engine, [batches[0]], criterion, engine_opt, scheduler, s.acc, Progress(), total_batches=1,
                     log_every=10 ** 9, use_image=True))}
        for name, found in waits.items():
            print(f"  host waits for the GPU in one {name} step: {found.get('count')} "
                  f"{found.get('where', found.get('error'))}", flush=True)
    s.acc.free_memory()
    result = _interleaved_result(names, images, seconds, before, "interleaved", per_step=per_step)
    return result | ({"device_waits": waits} if waits else {})


def device_waits(step: Callable[[], Any]) -> dict[str, Any]:
    """The operations in ``step`` that make the host wait for the GPU, as CUDA's sync debug mode reports them: how
    many, and the source lines that asked (file:line -> count). A failure is recorded (``error``), not raised: this
    runs after the timed measurements, which it must not lose."""
    try:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except Exception as err:  # noqa: BLE001 - reported in the results instead
        return {"error": f"{type(err).__name__}: {err}"}
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"count": sum(where.values()), "where": dict(where)}


def section_train(s: Setup) -> dict[str, Any]:
    args = s.args
    batches = s.memory_batches(args.warmup + args.train_batches, training=True)
    out: dict[str, Any] = {"bare": interleaved_training(s, batches)}
    e2e_names, e2e_fns = ["encoder_alone", "e2e_jpeg"], [lambda: train_encoder_alone(s, batches),
                                                        lambda: train_end_to_end(s, cache=False)]
    if args.cache:
        s.ensure_cache()
        e2e_names.append("e2e_cache")
        e2e_fns.append(lambda: train_end_to_end(s, cache=True))
    if args.device_decode:
        e2e_names.append("e2e_device_decode")
        e2e_fns.append(lambda: train_end_to_end(s, cache=False, decode=True))
    out["end_to_end"] = paired(tuple(e2e_names), tuple(e2e_fns), args.e2e_rounds)
    del batches
    bare, e2e = out["bare"], out["end_to_end"]
    joint_names = ("image_branch_only", "joint_plain_loop", "joint_train_one_epoch")
    out["ratios"] = {f"{name}/encoder_alone": ratio(bare[name], bare["encoder_alone"]) for name in joint_names}
    out["ratios"].update({f"{name}/encoder_alone (median of per-batch ratios)": median_paired_ratio(
        bare[name], bare["encoder_alone"]) for name in joint_names})
    out["ratios"].update({f"{name}/encoder_alone": ratio(e2e[name], e2e["encoder_alone"])
                          for name in e2e_names[1:]})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Inference


@torch.inference_mode()
def forward_joint(s: Setup, batches: list[dict[str, Any]]) -> tuple[int, float]:
    """The joint model's ``predict_proba`` (what prediction computes) on batches already on the device."""
    model = maybe_compile(s.joint_model().eval(), s.args)
    core = getattr(model, "_orig_mod", model)
    timed = Timed(batches, s.args.warmup, s.sync)
    for batch in timed:
        with s.acc.autocast():
            probs = core.predict_proba(**model_inputs(batch)) if not s.args.compile else \
                torch.sigmoid(model(**model_inputs(batch))["fused_logits"].float())
        probs.cpu()
    return timed.images, timed.seconds


def predict_end_to_end(s: Setup, cache: bool, workdir: Path, draft: Any = "auto",
                       decode: bool = False) -> tuple[int, float]:
    """`inference.predict_to_csv` over rows of the JPEG folder (or the cache): loader, model, CSV, all timed.

    A first call on ``warmup`` batches (not timed) warms the model up; the timed call includes starting the
    DataLoader workers, as a real prediction does.
    """
    model = s.joint_model().eval()
    accelerator = s.acc
    kwargs = dict(batch_size=s.args.batch_size, workers=s.args.workers, draft_size=draft,
                  image_cache=s.ensure_cache() if cache else None, channels_last=s.args.channels_last,
                  decode_on_device=decode)
    warm_rows = s.rows(s.args.warmup * s.args.batch_size)
    predict_to_csv(model, warm_rows, s.image_dir, workdir / "warmup.csv", accelerator, **kwargs)
    rows = s.rows(s.args.infer_images)
    s.sync()
    start = time.perf_counter()
    result = predict_to_csv(model, rows, s.image_dir, workdir / "predictions.csv", accelerator, **kwargs)
    s.sync()
    seconds = time.perf_counter() - start
    assert result["rows"] == len(rows)
    return len(rows), seconds


@torch.inference_mode()
def interleaved_forward(s: Setup, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The encoder alone and the joint model's ``predict_proba``, in turn on each batch (order alternating)."""
    encoder = maybe_compile(s.encoder_model().eval(), s.args)
    joint = s.joint_model().eval()

    def encoder_forward(batch: dict[str, Any]) -> None:
        with s.acc.autocast():
            encoder(batch["image"]).float().cpu()

    def joint_forward(batch: dict[str, Any]) -> None:
        with s.acc.autocast():
            joint.predict_proba(**model_inputs(batch)).cpu()

    return interleaved(s, {"encoder_alone": encoder_forward, "joint_predict_proba": joint_forward}, batches)


def section_infer(s: Setup, workdir: Path) -> dict[str, Any]:
    args = s.args
    batches = s.memory_batches(args.warmup + -(-args.infer_images // args.batch_size), training=False)
    out: dict[str, Any] = {"bare": interleaved_forward(s, batches)}
    names = ["joint_predict_proba", "predict_to_csv_jpeg"]
    fns = [lambda: forward_joint(s, batches), lambda: predict_end_to_end(s, False, workdir)]
    if args.cache:
        s.ensure_cache()
        names.append("predict_to_csv_cache")
        fns.append(lambda: predict_end_to_end(s, True, workdir))
    if args.device_decode:
        names.append("predict_to_csv_device_decode")
        fns.append(lambda: predict_end_to_end(s, False, workdir, decode=True))
    out["end_to_end"] = paired(tuple(names), tuple(fns), args.rounds)
    del batches
    bare, e2e = out["bare"], out["end_to_end"]
    out["ratios"] = {"joint_predict_proba/encoder_alone": ratio(bare["joint_predict_proba"], bare["encoder_alone"])}
    out["ratios"].update({f"{n}/joint_predict_proba": ratio(e2e[n], e2e["joint_predict_proba"])
                          for n in names[1:]})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Data loader and speed options


FIRST_BATCH: list[float] = []  # start-up of the loaders measured by `iterate_loader`, read by `section_loader`


def iterate_loader(loader: Iterable[dict[str, Any]], warmup: int) -> tuple[int, float]:
    timed = Timed(loader, warmup, lambda: None, length=0)
    for _ in timed:
        pass
    FIRST_BATCH.append(timed.first_batch_seconds)
    return timed.images, timed.seconds


def loader_rate(s: Setup, training: bool, workers: int, *, cache: bool = False, draft: Optional[int] = None,
                seeded: bool = False, encoded: bool = False) -> tuple[int, float]:
    """Images/s of the DataLoader alone (decode, transform, tokenize, collate), workers started before timing."""
    timed = s.args.loader_images if workers > 0 else min(s.args.loader_images, s.args.loader_images_single)
    n = timed + s.args.warmup * s.args.batch_size
    dataset: Any = s.dataset(s.rows(n), training, cache=cache, draft=draft, encoded=encoded)
    if seeded:
        from multimodal.engine import SeededAugmentation
        dataset = SeededAugmentation(dataset, seed=0)
    return iterate_loader(s.loader(dataset, workers), s.args.warmup)


def section_loader(s: Setup) -> dict[str, Any]:
    args = s.args
    out: dict[str, Any] = {}
    worker_counts = sorted({0, args.workers})
    configs = [(f"{kind}_jpeg_workers{w}", kind == "train", w, False) for w in worker_counts
               for kind in ("eval", "train")]
    if args.cache:
        s.ensure_cache()
        configs += [(f"cache_uint8_workers{w}", False, w, True) for w in worker_counts]
    if args.device_decode:  # the loader of --decode-on-device: it only reads the files
        configs += [(f"files_only_workers{w}", False, w, "files") for w in worker_counts]
    for name, training, workers, cache in configs:
        result = measure(name, lambda: loader_rate(s, training, workers, cache=cache is True,
                                                   encoded=cache == "files"))
        result["per_worker_images_per_s"] = round(result["images_per_s"] / max(1, workers), 3)
        result["first_batch_seconds"] = round(FIRST_BATCH[-1], 3)  # worker start-up + one batch
        out[name] = result
    # The transform's arithmetic on the device from cached bytes (what the cache leaves to the GPU/CPU).
    if args.cache:
        for training in (False, True):
            name = f"batch_transform_{'train' if training else 'eval'}_on_{s.device.type}"
            out[name] = measure(name, lambda: batch_transform_rate(s, training))
    if args.device_decode:  # decoding and resizing files already in memory, on the device (nvJPEG on a GPU)
        name = f"decode_resize_on_{s.device.type}"
        out[name] = measure(name, lambda: decode_rate(s))
    return out


def decode_rate(s: Setup) -> tuple[int, float]:
    """Images/s of `images.EncodedImageDecoder` alone: a batch of image files already read, decoded and resized to
    the cache's squares on the device."""
    decoder = s.decoder()
    files = [(s.image_dir / image_id).read_bytes() for image_id in s.rows(s.args.batch_size)["ImageID"]]
    return repeated_batch_rate(s, lambda: decoder(files))


def batch_transform_rate(s: Setup, training: bool) -> tuple[int, float]:
    cache = s.ensure_cache()
    transform = BatchImageTransform(s.args.encoder, s.size, training, channels_last=s.args.channels_last).to(s.device)
    images = torch.from_numpy(np.array(cache.array[:s.args.batch_size])).to(s.device)
    return repeated_batch_rate(s, lambda: transform(images))


def repeated_batch_rate(s: Setup, step: Callable[[], Any]) -> tuple[int, float]:
    """(images, seconds) of ``step`` on one batch, repeated to ``--loader-images`` after ``--warmup`` untimed calls."""
    for _ in range(s.args.warmup):
        step()
    s.sync()
    reps = max(1, s.args.loader_images // s.args.batch_size)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    s.sync()
    return reps * s.args.batch_size, time.perf_counter() - start


def draft_engagement(s: Setup, size: int, n: int) -> dict[str, Any]:
    """How many of the first ``n`` images the JPEG draft actually decodes smaller at this resolution."""
    need = draft_size_for(s.args.encoder, size)
    smaller = 0
    for image_id in s.rows(n)["ImageID"]:
        full = load_image(s.image_dir / image_id)
        small = load_image(s.image_dir / image_id, need)
        smaller += small.size != full.size
    return {"draft_size": need, "images": n, "decoded_smaller": smaller}


def section_draft_accuracy(args: argparse.Namespace, frame: pd.DataFrame, image_dir: Path) -> dict[str, Any]:
    """Does draft decoding change accuracy? A linear probe on frozen ImageNet-pretrained tf_efficientnet_lite0
    features (offline weights): trained (BCE, full batch) on full-size decodes of the first ``n_train`` rows,
    evaluated on the next ``n_val`` rows decoded at full size, with draft, and, for scale, at full size with bilinear
    instead of bicubic resizing (another harmless-looking preprocessing change); with the device decoding
    measurements on, also decoded and resized by `images.EncodedImageDecoder` (what ``--decode-on-device`` feeds the
    model, here on ``--device``) instead of by Pillow."""
    from timm.data import create_transform

    from multimodal.metrics import binarize, samples_f1
    from multimodal.model import ImageEncoder

    name = "tf_efficientnet_lite0"
    try:
        encoder = ImageEncoder(name, pretrained=True).eval()
    except Exception as err:  # noqa: BLE001 - offline weights missing: say so in the results
        return {"skipped": f"no pretrained {name}: {err}"}
    n_train, n_val = args.draft_accuracy_rows
    train_rows, val_rows = frame.iloc[:n_train], frame.iloc[n_train: n_train + n_val]
    codec = LabelCodec.from_labels(frame["Labels"])
    y_train = torch.from_numpy(np.stack([codec.encode(x) for x in train_rows["Labels"]]))
    y_val = np.stack([codec.encode(x) for x in val_rows["Labels"]])

    @torch.inference_mode()
    def features(rows: pd.DataFrame, size: int, draft: Optional[int] = None, interpolation: Optional[str] = None,
                 on_device: bool = False) -> torch.Tensor:
        """``on_device``: decoded and resized by `images.EncodedImageDecoder` (what ``--decode-on-device`` feeds the
        model) instead of by Pillow and timm's transform."""
        if on_device:
            device = torch.device("cuda" if args.device == "cuda" else "cpu")
            decoder = EncodedImageDecoder.for_model(name, size, device=device)
            transform = BatchImageTransform(name, size, training=False, channels_last=False).to(device)
            dataset = ImageCaptionDataset(rows, image_dir, encoded_images=True)

            def images(batch: dict[str, Any]) -> torch.Tensor:
                return transform(decode_images(batch, decoder)["image"]).cpu()
        else:
            config = resolve_image_config(name, size)
            if interpolation:
                config["interpolation"] = interpolation
            dataset = ImageCaptionDataset(rows, image_dir, transform=create_transform(**config, is_training=False),
                                          draft_size=draft)

            def images(batch: dict[str, Any]) -> torch.Tensor:
                return batch["image"]
        loader = DataLoader(dataset, batch_size=64, num_workers=args.workers, collate_fn=Collator())
        return torch.cat([encoder(images(batch)) for batch in loader])

    out: dict[str, Any] = {"model": name, "weights": encoder.pretrained_source, "train_rows": n_train,
                           "val_rows": n_val, "loadavg_before": loadavg()}
    for size in args.draft_accuracy_sizes:
        need = draft_size_for(name, size)
        start = time.perf_counter()
        torch.manual_seed(0)
        x_train = features(train_rows, size)
        probe = torch.nn.Linear(x_train.shape[1], codec.num_labels)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-4)
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        for _ in range(300):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe((x_train - mean) / std), y_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        row: dict[str, Any] = {"draft_size": need}
        preds = {}
        variants: dict[str, dict[str, Any]] = {"full": {}, "draft": {"draft": need},
                                               "full_bilinear": {"interpolation": "bilinear"}}
        if args.device_decode:
            variants["device_decode"] = {"on_device": True}
        feats = {}
        for variant, kwargs in variants.items():
            feats[variant] = features(val_rows, size, **kwargs)
            with torch.no_grad():
                probs = torch.sigmoid(probe((feats[variant] - mean) / std)).numpy()
            preds[variant] = binarize(probs, 0.5, at_least_one=True)
            row[f"val_samples_f1_{variant}"] = round(float(samples_f1(preds[variant], y_val).mean()), 4)
        for variant in (v for v in variants if v != "full"):
            row[f"prediction_agreement_{variant}_vs_full"] = round(float((preds[variant] == preds["full"]).all(1)
                                                                         .mean()), 4)
            cosine = torch.nn.functional.cosine_similarity(feats[variant], feats["full"], dim=1)
            row[f"feature_cosine_{variant}_vs_full_mean"] = round(float(cosine.mean()), 5)
        row["val_images_decoded_smaller"] = int(sum(load_image(image_dir / i, need).size !=
                                                    load_image(image_dir / i).size for i in val_rows["ImageID"]))
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["loadavg_after"] = loadavg()
        print(f"  draft accuracy at {size} px: {row}", flush=True)
        out[str(size)] = row
    return out


def persistent_workers_rate(s: Setup, persistent: bool, epochs: int = 3) -> tuple[int, float]:
    """Several short epochs (as validation each epoch is): worker start-up is paid once or every epoch."""
    n = max(2, s.args.warmup + 1) * s.args.batch_size
    loader = s.loader(s.dataset(s.rows(n), training=False), s.args.workers, persistent=persistent)
    images = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += len(batch["image_id"])
    seconds = time.perf_counter() - start
    del loader
    return images, seconds


def _encoder_train_step(s: Setup, model: torch.nn.Module, optimizer: Any,
                        fmt: torch.memory_format) -> Callable[[dict[str, Any]], None]:
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()

    def step(batch: dict[str, Any]) -> None:
        loss = loss_fn(model(batch["image"].contiguous(memory_format=fmt)).float(), batch["targets"])
        s.acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _encoder_train_pair(s: Setup, batches: list[dict[str, Any]],
                        variants: dict[str, tuple[torch.memory_format, bool]]) -> dict[str, Any]:
    """The bare encoder's training step in each variant (memory format, compiled in place or not), interleaved batch
    by batch over ``batches``."""
    steps = {}
    for name, (fmt, compiled) in variants.items():
        model = s.encoder_model().to(memory_format=fmt)
        if compiled:
            model.compile()
        optimizer = adamw(model.parameters(), lr=1e-3)
        model, optimizer = s.acc.prepare(model, optimizer)
        steps[name] = _encoder_train_step(s, model, optimizer, fmt)
    pair = interleaved(s, steps, batches)
    s.acc.free_memory()
    return pair


def _joint_train_step(s: Setup, model: torch.nn.Module, optimizer: Any,
                      accelerator: Optional[Accelerator] = None) -> Callable[[dict[str, Any]], None]:
    """The joint model's plain training step: forward with teacher forcing, joint loss, backward, AdamW step.
    ``accelerator``: the one that prepared the model and optimizer (its gradient scaler under fp16), else ``s.acc``."""
    criterion = JointLoss(LossConfig())
    model.train()
    acc = accelerator or s.acc

    def step(batch: dict[str, Any]) -> None:
        outputs = model(**model_inputs(batch), label_seq=batch["label_seq"])
        acc.backward(criterion(outputs, batch["targets"], batch["label_seq"])["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _encoder_forward_step(s: Setup, model: torch.nn.Module,
                          fmt: torch.memory_format) -> Callable[[dict[str, Any]], None]:
    def step(batch: dict[str, Any]) -> None:
        with torch.inference_mode(), s.acc.autocast():
            model(batch["image"].contiguous(memory_format=fmt)).float().cpu()
    return step


def section_options(s: Setup) -> dict[str, Any]:
    args = s.args
    out: dict[str, Any] = {}
    rounds = args.rounds
    # JPEG draft decoding: the loader alone, one process (the per-core cost), with/without, at several resolutions.
    out["draft"] = {}
    for size in sorted(set(args.draft_sizes) | {s.size}, reverse=True):
        sub = Setup.__new__(Setup)
        sub.__dict__.update(s.__dict__)
        sub.size, sub.image_config = size, resolve_image_config(args.encoder, size)
        need = draft_size_for(args.encoder, size)
        pair = paired(("no_draft", "draft"), (lambda: loader_rate(sub, False, 0),
                                              lambda: loader_rate(sub, False, 0, draft=need)), rounds)
        pair["ratio_draft/no_draft"] = ratio(pair["draft"], pair["no_draft"])
        pair["engagement"] = draft_engagement(sub, size, min(args.loader_images, 256))
        out["draft"][str(size)] = pair
    # channels_last, bare encoder, training step and forward, interleaved batch by batch.
    train_batches = s.memory_batches(args.warmup + args.option_batches, training=True)
    pair = _encoder_train_pair(s, train_batches, {"contiguous": (torch.contiguous_format, False),
                                                  "channels_last": (torch.channels_last, False)})
    pair["ratio_channels_last/contiguous"] = ratio(pair["channels_last"], pair["contiguous"])
    out["channels_last_train"] = pair
    # The joint model's training step with the caption LSTM on packed against padded captions (`CaptionEncoder.
    # lstm_impl`: the same results), and with the default (for-loop) AdamW against the fused one (`engine.adamw`).
    for option, variants in (("caption_lstm_train", ("packed", "padded")), ("fused_adamw_train", ("loop", "fused"))):
        steps = {}
        for variant in variants:
            model = s.joint_model()
            optimizer = build_optimizer(model, 1e-3, 1e-3, 1e-4)
            if option == "caption_lstm_train":
                model.caption_encoder.lstm_impl = variant
            else:
                for group in optimizer.param_groups:  # the update is the same either way; only the kernel differs
                    group["fused"] = variant == "fused" and group["fused"]
            model, optimizer = s.acc.prepare(model, optimizer)
            steps[variant] = _joint_train_step(s, model, optimizer)
        pair = interleaved(s, steps, train_batches)
        s.acc.free_memory()
        pair[f"ratio_{variants[1]}/{variants[0]}"] = ratio(pair[variants[1]], pair[variants[0]])
        pair[f"ratio_{variants[1]}/{variants[0]} (median of per-batch ratios)"] = median_paired_ratio(
            pair[variants[1]], pair[variants[0]])
        out[option] = pair
    # The caption encoder alone (forward + backward), packed against padded, on the same captions: the part of the
    # step that the choice changes, too small a share of the whole step for the pair above to resolve on a CPU.
    encoder = s.joint_model(image_encoder=None, use_decoder=False).caption_encoder.train()  # no CNN built for nothing

    def caption_step(impl: str) -> Callable[[dict[str, Any]], None]:
        def step(batch: dict[str, Any]) -> None:
            encoder.lstm_impl = impl
            encoder(batch["caption_ids"], batch["caption_lengths"]).sum().backward()
            encoder.zero_grad(set_to_none=True)
        return step
    pair = interleaved(s, {impl: caption_step(impl) for impl in ("packed", "padded")},
                       train_batches * args.caption_repeats, label="caption encoder")
    pair["ratio_padded/packed"] = ratio(pair["padded"], pair["packed"])
    pair["ratio_padded/packed (median of per-batch ratios)"] = median_paired_ratio(pair["padded"], pair["packed"])
    out["caption_lstm_encoder_alone"] = pair
    del train_batches, steps
    eval_batches = s.memory_batches(args.warmup + args.option_batches, training=False)
    steps = {}
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        steps[layout] = _encoder_forward_step(s, s.encoder_model().eval().to(memory_format=fmt), fmt)
    pair = interleaved(s, steps, eval_batches)
    pair["ratio_channels_last/contiguous"] = ratio(pair["channels_last"], pair["contiguous"])
    out["channels_last_forward"] = pair
    # torch.compile of the bare encoder's forward; its compile time is the first batch (not timed in the rate).
    if args.try_compile and not args.compile:
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = s.encoder_model().eval()
        steps = {"eager": _encoder_forward_step(s, model, fmt),
                 "compiled": _encoder_forward_step(s, torch.compile(model), fmt)}
        pair = interleaved(s, steps, eval_batches)
        pair["ratio_compiled/eager"] = ratio(pair["compiled"], pair["eager"])
        pair["compile_seconds"] = pair["compiled"].get("first_batch_seconds")
        out["compile_forward"] = pair
    del eval_batches
    # Persistent workers over several short epochs.
    if args.workers > 0:
        pair = paired(("not_persistent", "persistent"), (lambda: persistent_workers_rate(s, False),
                                                         lambda: persistent_workers_rate(s, True)), rounds)
        pair["ratio_persistent/not_persistent"] = ratio(pair["persistent"], pair["not_persistent"])
        out["persistent_workers"] = pair
    # Per-sample seeded augmentation (engine.SeededAugmentation, when present), loader alone, one process.
    with contextlib.suppress(ImportError):
        from multimodal.engine import SeededAugmentation  # noqa: F401
        pair = paired(("plain", "seeded"), (lambda: loader_rate(s, True, 0), lambda: loader_rate(s, True, 0,
                                                                                                  seeded=True)),
                      rounds)
        pair["ratio_seeded/plain"] = ratio(pair["seeded"], pair["plain"])
        out["seeded_augmentation"] = pair
    out["pin_memory"] = ("measured only on CUDA (see the GPU run)" if s.device.type != "cuda" else
                         "on: every CUDA loader here pins memory")
    # torch.compile of the bare encoder's training step (forward, backward, AdamW), in place (`nn.Module.compile`, as
    # a user would, keeping the weights' names); its compile time is the first batch (not timed in the rate). Last,
    # as its compilation is the longest measurement here: under a time limit (gpu.sh) the others come first.
    if args.try_compile and not args.compile:
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        pair = _encoder_train_pair(s, s.memory_batches(args.warmup + args.option_batches, training=True),
                                   {"eager": (fmt, False), "compiled": (fmt, True)})
        pair["ratio_compiled/eager"] = ratio(pair["compiled"], pair["eager"])
        pair["ratio_compiled/eager (median of per-batch ratios)"] = median_paired_ratio(pair["compiled"],
                                                                                       pair["eager"])
        pair["compile_seconds"] = pair["compiled"].get("first_batch_seconds")
        out["compile_train"] = pair
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Memory of the real scripts, as subprocesses with their DataLoader workers


def run_with_peak_memory(cmd: list[str], env: Optional[dict[str, str]] = None, interval: float = 0.1,
                         cwd: Optional[Path] = None) -> dict[str, Any]:
    """Runs ``cmd``; samples the RSS (and PSS, where readable) of its whole process tree.

    ``tree_rss`` sums the processes' RSS (pages shared between the main process and its forked workers are counted
    once per process: an upper bound); ``tree_pss`` shares them out (the physical memory actually used);
    ``max_process_rss`` is the largest single process (``ru_maxrss`` of the children, exact).
    """
    try:
        import psutil
    except ImportError:  # only the largest single process (ru_maxrss) is then known
        psutil = None

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"tree_rss": 0, "tree_pss": 0, "processes": 0, "process_rss": 0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    root = psutil.Process(proc.pid) if psutil is not None else None
    tick = 0
    while proc.poll() is None:
        if root is None:
            time.sleep(interval)
            continue
        with contextlib.suppress(psutil.Error):
            procs = [root] + root.children(recursive=True)
            rss = pss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    one = p.memory_info().rss
                    rss += one
                    peak["process_rss"] = max(peak["process_rss"], one)
                    if tick % 5 == 0:
                        pss += getattr(p.memory_full_info(), "pss", 0)
            peak["tree_rss"] = max(peak["tree_rss"], rss)
            if tick % 5 == 0:
                peak["tree_pss"] = max(peak["tree_pss"], pss)
            peak["processes"] = max(peak["processes"], len(procs))
        tick += 1
        time.sleep(interval)
    reader.join(timeout=5)
    seconds = time.perf_counter() - start
    import resource
    children_maxrss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "seconds": round(seconds, 2),
              "peak_tree_rss_mib": round(peak["tree_rss"] / 2 ** 20, 1),
              "peak_tree_pss_mib": round(peak["tree_pss"] / 2 ** 20, 1),
              "peak_single_process_rss_mib": round(peak["process_rss"] / 2 ** 20, 1),
              "max_processes": peak["processes"], "children_ru_maxrss_mib_so_far": round(children_maxrss_kib / 1024, 1),
              "loadavg_after": loadavg()}
    if proc.returncode != 0:
        result["output_tail"] = "".join(output)[-3000:]
    print(f"  {' '.join(cmd[1:3])}...: rc {proc.returncode}, {seconds:.1f} s, peak tree RSS "
          f"{result['peak_tree_rss_mib']} MiB, PSS {result['peak_tree_pss_mib']} MiB, "
          f"{peak['processes']} processes", flush=True)
    return result


def section_memory(args: argparse.Namespace, frame: pd.DataFrame, image_dir: Path, workdir: Path) -> dict[str, Any]:
    """Peak memory of ``predict.py`` over few and many images (it streams: should be flat) and of ``train.py``."""
    out: dict[str, Any] = {}
    size = args.memory_image_size
    codec = LabelCodec.from_labels(frame["Labels"])
    tokenizer = train_caption_tokenizer(frame["Caption"])
    config = ModelConfig(num_labels=codec.num_labels, image_encoder=args.encoder, image_size=size,
                         vocab_size=tokenizer.get_vocab_size(), max_labels=int(frame["Labels"].map(len).max()))
    model_dir = workdir / "model"
    MultimodalClassifier(config).save_pretrained(model_dir, codec=codec, tokenizer=tokenizer)
    python = sys.executable
    for n in args.memory_images:
        csv = workdir / f"rows-{n}.csv"
        reps = -(-n // len(frame))
        pd.concat([frame[["ImageID", "Caption"]]] * reps).iloc[:n].to_csv(csv, index=False)
        cmd = [python, str(ROOT / "predict.py"), "--checkpoint", str(model_dir), "--csv", str(csv), "--image-dir",
               str(image_dir), "--output", str(workdir / f"pred-{n}.csv"), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers)]
        result = run_with_peak_memory(cmd, env=dict(os.environ), cwd=ROOT)
        result.update(images=n, image_size=size, images_per_s_including_startup=round(n / result["seconds"], 2))
        out[f"predict_{n}"] = result
    if len(args.memory_images) >= 2:
        lo, hi = min(args.memory_images), max(args.memory_images)
        out["ratio_peak_tree_pss_many/few"] = round(out[f"predict_{hi}"]["peak_tree_pss_mib"] /
                                                    max(1e-9, out[f"predict_{lo}"]["peak_tree_pss_mib"]), 3)
        out["ratio_peak_tree_rss_many/few"] = round(out[f"predict_{hi}"]["peak_tree_rss_mib"] /
                                                    max(1e-9, out[f"predict_{lo}"]["peak_tree_rss_mib"]), 3)
    if args.omp_compare_images:  # predict.py with and without passive OpenMP waiting
        n = args.omp_compare_images
        csv = workdir / f"rows-{n}.csv"
        frame[["ImageID", "Caption"]].iloc[:n].to_csv(csv, index=False)
        for policy in ("ACTIVE-default", "PASSIVE"):
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy == "PASSIVE":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            cmd = [python, str(ROOT / "predict.py"), "--checkpoint", str(model_dir), "--csv", str(csv),
                   "--image-dir", str(image_dir), "--output", str(workdir / "pred-omp.csv"),
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            result = run_with_peak_memory(cmd, env=env, cwd=ROOT)
            result.update(images=n, images_per_s_including_startup=round(n / result["seconds"], 2))
            out[f"predict_omp_{policy}"] = result
        rates = [out[f"predict_omp_{p}"]["images_per_s_including_startup"] for p in ("PASSIVE", "ACTIVE-default")]
        out["ratio_predict_passive/default"] = round(rates[0] / rates[1], 3)
    if args.memory_train:
        cmd = [python, str(ROOT / "train.py"), "--output-dir", str(workdir / "train-run")] + args.train_extra
        result = run_with_peak_memory(cmd, env=dict(os.environ), cwd=ROOT)
        result["note"] = "train.py at its defaults (demo data, tf_efficientnet_lite0, 64 px, batch 32, 2 workers)"
        out["train_default"] = result
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Main


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def section_checkpoint(s: Setup, workdir: Path) -> dict[str, Any]:
    """A checkpoint of the joint model at the benchmark's settings (AdamW moments after a few steps), saved and checked
    ``--checkpoint-rounds`` times, the variants alternating their order each round:

    - ``manager``: `CheckpointManager.save`, what train.py runs (safetensors + JSON, SHA-256 manifest, fsync of every
      file and folder, rename into place, pruning);
    - ``raw``: `engine.save_training_state` alone, the same files without the manifest, fsync and renames;
    - ``accelerate``: ``accelerator.save_state`` (pickled optimizer, scheduler and generator states), what it replaced;
    - ``check``: `CheckpointManager.problem` (every file read and hashed), against ``load``, `load_training_state`.

    Each is also expressed in training steps of the same model and batches (the plain joint step), which is what a
    checkpoint every N steps costs: ``manager_in_steps / N`` of the run. The files are on the benchmark's temporary
    folder (``--checkpoint-dir`` to choose the disk)."""
    args = s.args
    acc = Accelerator(mixed_precision=args.precision, cpu=s.device.type == "cpu")  # its own list of prepared objects
    model = s.joint_model()
    optimizer = build_optimizer(model, lr=1e-3, backbone_lr=1e-4, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(1000, 10))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    batches = s.memory_batches(args.warmup + args.train_batches, training=True)
    step = _joint_train_step(s, model, optimizer, acc)
    for batch in batches[:args.warmup]:
        step(batch)
    s.sync()
    start = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
        scheduler.step()
    s.sync()
    step_seconds = (time.perf_counter() - start) / max(1, args.train_batches)

    root = Path(args.checkpoint_dir or workdir) / "checkpoint-bench"
    shutil.rmtree(root, ignore_errors=True)
    manager = CheckpointManager(acc, root / "run", keep=1)
    counter = iter(range(1, 1 << 30))

    def save_manager() -> Path:
        return manager.save(Progress(step=next(counter)))

    def save_raw() -> Path:
        folder = root / "raw"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        save_training_state(acc, folder)
        return folder

    def save_accelerate() -> Path:
        folder = root / "accelerate"
        shutil.rmtree(folder, ignore_errors=True)
        acc.save_state(str(folder))
        return folder

    savers = {"manager": save_manager, "raw": save_raw, "accelerate": save_accelerate}
    seconds: dict[str, list[float]] = {name: [] for name in [*savers, "check", "load"]}
    checkpoint = save_manager()  # untimed: the first save makes the folders
    loadavg_before = loadavg()
    for r in range(args.checkpoint_rounds):
        names = list(savers) if r % 2 == 0 else list(savers)[::-1]
        for name in names:
            start = time.perf_counter()
            folder = savers[name]()
            seconds[name].append(time.perf_counter() - start)
            if name == "manager":
                checkpoint = folder
        for name in ("check", "load") if r % 2 == 0 else ("load", "check"):
            start = time.perf_counter()
            if name == "check":
                problem = CheckpointManager.problem(checkpoint)
                assert problem is None, problem
            else:
                load_training_state(acc, checkpoint)
            seconds[name].append(time.perf_counter() - start)
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}
    median = {name: float(np.median(v)) for name, v in seconds.items()}
    result = {
        "files": sizes, "bytes": sum(sizes.values()),
        "accelerate_bytes": sum(p.stat().st_size for p in (root / "accelerate").rglob("*") if p.is_file()),
        "parameters": sum(p.numel() for p in acc.unwrap_model(model).parameters()),
        "train_step_seconds": round(step_seconds, 4), "batch_size": args.batch_size, "image_size": s.size,
        "rounds": args.checkpoint_rounds, "seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()},
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "in_train_steps": {k: round(v / step_seconds, 3) for k, v in median.items()},
        "ratios": {"manager/raw": round(median["manager"] / median["raw"], 3),
                   "manager/accelerate": round(median["manager"] / median["accelerate"], 3),
                   "check/load": round(median["check"] / median["load"], 3)},
        "disk": str(root), "loadavg_before": loadavg_before, "loadavg_after": loadavg()}
    for name in seconds:
        print(f"  {name:<12s} {median[name]:8.3f} s  = {median[name] / step_seconds:6.2f} training steps "
              f"({step_seconds:.3f} s each)", flush=True)
    print(f"  checkpoint {result['bytes'] / 2**20:.1f} MiB; manager/raw {result['ratios']['manager/raw']}, "
          f"manager/accelerate {result['ratios']['manager/accelerate']}, check/load {result['ratios']['check/load']}",
          flush=True)
    shutil.rmtree(root, ignore_errors=True)
    acc.free_memory()
    return result


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=os.environ.get("MULTIMODAL_COMP5329", str(ROOT.parent / "shared/comp5329")),
                   help="dataset folder (train.csv, data/); default $MULTIMODAL_COMP5329 or ../shared/comp5329")
    g.add_argument("--encoder", default="efficientnet_b0", help="timm image encoder (random weights)")
    g.add_argument("--sizes", type=int, nargs="+", default=[224, 128], help="resolutions")
    g.add_argument("--batch-size", type=int, default=32, help="images per batch, every measurement")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers (end to end and loader)")
    g = p.add_argument_group("counts (images per measurement, warm-up excluded)")
    g.add_argument("--train-batches", type=int, default=4, help="timed training batches")
    g.add_argument("--infer-images", type=int, default=256, help="timed inference images")
    g.add_argument("--loader-images", type=int, default=256, help="timed images of the loader-only measurements")
    g.add_argument("--loader-images-single", type=int, default=1024,
                   help="at most this many timed images when the loader runs in the main process (0 workers)")
    g.add_argument("--option-batches", type=int, default=4, help="timed batches of the channels_last/compile pairs")
    g.add_argument("--caption-repeats", type=int, default=8,
                   help="passes over the option batches of the caption-encoder-alone pair (milliseconds each)")
    g.add_argument("--warmup", type=int, default=1, help="untimed batches before each measurement")
    g.add_argument("--distinct-batches", type=int, default=16,
                   help="most distinct in-memory batches of the bare measurements (cycled beyond)")
    g.add_argument("--rounds", type=int, default=2, help="alternating rounds of each paired measurement")
    g.add_argument("--e2e-rounds", type=int, default=1, help="rounds of the end-to-end training measurements")
    g = p.add_argument_group("device and options")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the model runs")
    g.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="Accelerate mixed precision")
    g.add_argument("--channels-last", action="store_true", help="channels_last model and inputs everywhere")
    g.add_argument("--compile", action="store_true", help="torch.compile every model measured")
    g.add_argument("--caption-hidden", type=int, default=ModelConfig.caption_hidden,
                   help="the caption LSTM's hidden units (train.py's default unless given)")
    g.add_argument("--try-compile", action="store_true",
                   help="measure torch.compile of the bare encoder's forward and training step (options)")
    g.add_argument("--no-cache", dest="cache", action="store_false", help="skip the uint8 image cache measurements")
    g.add_argument("--no-device-decode", dest="device_decode", action="store_false",
                   help="skip the measurements of image files decoded on the device (--decode-on-device)")
    g.add_argument("--cache-dir", default=None, help="where the uint8 cache is built (default: a temporary folder)")
    g.add_argument("--reuse-cache", action="store_true", help="reuse a matching cache instead of timing a build")
    g.add_argument("--keep-cache", action="store_true", help="leave the cache in --cache-dir for a later run")
    g.add_argument("--cache-workers", type=int, default=None, help="processes building the cache (default: cores)")
    g.add_argument("--draft-sizes", type=int, nargs="+", default=[224, 128, 64], help="resolutions of the draft pair")
    g.add_argument("--draft-accuracy-sizes", type=int, nargs="+", default=[96, 64],
                   help="resolutions of the draft accuracy probe (section draft)")
    g.add_argument("--draft-accuracy-rows", type=int, nargs=2, default=[2000, 1000], metavar=("TRAIN", "VAL"),
                   help="rows of the linear probe's training and validation parts")
    g = p.add_argument_group("memory (subprocesses)")
    g.add_argument("--memory-images", type=int, nargs="+", default=[320, 3200], help="predict.py row counts")
    g.add_argument("--memory-image-size", type=int, default=224, help="model resolution of the predict.py runs")
    g.add_argument("--omp-compare-images", type=int, default=0, help="predict.py with/without OMP passive (0: skip)")
    g.add_argument("--no-memory-train", dest="memory_train", action="store_false", help="skip train.py's peak")
    g.add_argument("--train-extra", nargs=argparse.REMAINDER, default=[], help="extra train.py arguments (last)")
    g = p.add_argument_group("checkpoint")
    g.add_argument("--checkpoint-rounds", type=int, default=5, help="saves and checks of each kind")
    g.add_argument("--checkpoint-dir", default=None, help="where the checkpoints are written (default: a temporary "
                   "folder); the disk decides what fsync costs")
    g = p.add_argument_group("run")
    g.add_argument("--sections", default="train,infer,loader,options", help=f"comma-separated subset of {SECTIONS}")
    g.add_argument("--output", default=None, help="JSON results (default benchmarks/results/throughput-<device>.json)")
    g.add_argument("--smoke", action="store_true", help="tiny counts on the demo data: checks the script in seconds")
    g.add_argument("--label", default="", help="free text stored with the results")
    return p


def apply_smoke(args: argparse.Namespace, workdir: Path) -> None:
    from multimodal.demo import make_demo_dataset
    args.data_dir = str(make_demo_dataset(workdir / "demo", num_train=48, num_test=4, image_size=48))
    args.sizes, args.batch_size, args.workers = [32], 4, 0
    args.train_batches, args.infer_images, args.loader_images, args.option_batches = 1, 8, 8, 1
    args.warmup, args.rounds, args.e2e_rounds, args.cache_workers = 1, 1, 1, 0
    args.draft_sizes, args.draft_accuracy_sizes, args.draft_accuracy_rows = [32], [32], [24, 16]
    args.memory_images, args.memory_image_size, args.memory_train = [8, 16], 32, False
    args.checkpoint_rounds = 1


def main(args: argparse.Namespace) -> dict[str, Any]:
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    workdir = Path(tempfile.mkdtemp(prefix="mm-throughput-"))
    try:
        if args.smoke:
            apply_smoke(args, workdir)
        if args.cache_dir is None:
            args.cache_dir = str(workdir / "cache")
        if args.cache_workers is None:
            args.cache_workers = os.cpu_count() or 1
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        accelerator = Accelerator(mixed_precision=args.precision, cpu=device.type == "cpu")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        data_dir = Path(args.data_dir)
        frame = read_annotations(data_dir / "train.csv")
        image_dir = data_dir / "data"
        results: dict[str, Any] = {"machine": machine_info(accelerator.device), "command": " ".join(sys.argv),
                                   "args": {k: v for k, v in vars(args).items()}, "label": args.label,
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sizes": {}}
        print(f"throughput: {args.encoder}, batch {args.batch_size}, {args.workers} workers, device "
              f"{accelerator.device}, precision {args.precision}, channels_last {args.channels_last}, load "
              f"{loadavg()}", flush=True)
        t_run = time.perf_counter()
        args.train_images = (args.train_batches + args.warmup) * args.batch_size
        for size in args.sizes if set(sections) - {"memory", "draft", "checkpoint"} else []:
            print(f"[{size} px]", flush=True)
            s = Setup(args, frame, image_dir, size, accelerator)
            per: dict[str, Any] = {}
            if "train" in sections:
                print(" training", flush=True)
                per["train"] = section_train(s)
            if "infer" in sections:
                print(" inference", flush=True)
                per["infer"] = section_infer(s, workdir)
            if "loader" in sections:
                print(" data loader alone", flush=True)
                per["loader"] = section_loader(s)
            if "options" in sections:
                print(" speed options (with/without)", flush=True)
                per["options"] = section_options(s)
            if s.cache_info:
                per["image_cache"] = s.cache_info
            results["sizes"][str(size)] = per
            if s.cache is not None and not args.keep_cache:  # a cache per resolution; free the disk
                for suffix in (".npy", ".json"):
                    s.cache.path.with_suffix(suffix).unlink(missing_ok=True)
        if "draft" in sections:
            print("[draft decoding: accuracy of a linear probe]", flush=True)
            results["draft_accuracy"] = section_draft_accuracy(args, frame, image_dir)
        if "memory" in sections:
            print("[memory]", flush=True)
            results["memory"] = section_memory(args, frame, image_dir, workdir)
        if "checkpoint" in sections:
            print(f"[checkpoint: joint model at {args.sizes[0]} px, batch {args.batch_size}]", flush=True)
            results["checkpoint"] = section_checkpoint(Setup(args, frame, image_dir, args.sizes[0], accelerator),
                                                       workdir)
        results["summary"] = summarise(results)
        results["total_seconds"] = round(time.perf_counter() - t_run, 1)
        results["loadavg_end"] = loadavg()
        output = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / \
            f"throughput-{accelerator.device.type}.json"
        save_json(results, output)
        print_summary(results)
        print(f"wrote {output} ({results['total_seconds']} s)", flush=True)
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: images/s and ratios per resolution (targets: ratios >= 0.90)."""
    summary: dict[str, Any] = {}
    for size, per in results["sizes"].items():
        row: dict[str, Any] = {}
        for section in ("train", "infer"):
            if section in per:
                row[f"{section}_images_per_s"] = {f"{part}:{k}": v["images_per_s"]
                                                  for part in ("bare", "end_to_end")
                                                  for k, v in per[section][part].items()}
                row[f"{section}_ratios"] = per[section]["ratios"]
        if "loader" in per:
            row["loader_images_per_s"] = {k: v["images_per_s"] for k, v in per["loader"].items()}
        if "options" in per:
            opts = per["options"]
            row["option_ratios"] = {f"{name}:{k[len('ratio_'):]}": v for name, pair in opts.items()
                                    if isinstance(pair, dict) for k, v in pair.items() if k.startswith("ratio")}
            row["option_ratios"].update({f"draft_{sz}px/no_draft": pair["ratio_draft/no_draft"]
                                         for sz, pair in opts.get("draft", {}).items()})
        if "image_cache" in per:
            row["image_cache"] = {k: per["image_cache"][k] for k in ("images", "size", "build_seconds",
                                                                    "build_images_per_s", "reused")}
        summary[size] = row
    if "checkpoint" in results:
        summary["checkpoint"] = {k: results["checkpoint"][k] for k in ("bytes", "median_seconds", "in_train_steps",
                                                                       "ratios")}
    if "memory" in results:
        summary["memory"] = {k: (v if not isinstance(v, dict) else
                                 {m: v[m] for m in ("peak_tree_rss_mib", "peak_tree_pss_mib", "seconds", "returncode")})
                             for k, v in results["memory"].items()}
    return summary


def print_summary(results: dict[str, Any]) -> None:
    print("summary:")
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
