"""Training and evaluation loops under Accelerate, and the checkpoints that make a run resumable.

Accelerate owns devices, mixed precision and distribution: there is no hand-written autocast, GradScaler or DDP code
here. A checkpoint holds what `accelerator.save_state` would (the prepared models, optimizers, schedulers and
gradient scaler, each process's generators and Accelerate's step), as safetensors + JSON instead of pickles, plus
``progress.json`` (epoch, batches done in that epoch, global step, the epoch's loss sums so far), a SHA-256 manifest
and, with a weight average (`build_ema`), ``ema.safetensors``; it is written into a temporary folder, flushed to disk
and renamed into place only when complete, so a crash never leaves a half-written checkpoint (`CheckpointManager`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from safetensors.torch import load_file, save_file
from timm.utils import ModelEmaV3
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .config import fsync, fsync_tree, save_json
from .metrics import compute_metrics

logger = logging.getLogger("multimodal")

MODEL_INPUTS = ("image", "caption_ids", "caption_lengths", "image_features")


@dataclass
class Progress:
    """Where a run is: ``batches_done`` batches of epoch ``epoch`` are behind us, ``step`` optimizer steps in all.

    ``loss_sums`` and ``loss_batches``: the main process's loss terms summed over the epoch's batches so far, so that
    an epoch resumed mid-way logs the mean of the whole epoch, as an uninterrupted run does (checkpoints written before
    they existed resume without them: that epoch's mean then covers the batches after the resume).

    ``train_seconds``: the time spent in the training loop (validation included) so far, over every session of a
    resumed run; each interrupted session counts up to its last checkpoint (the work after it is done again). It runs
    between `start_clock` and each `clock` (every checkpoint calls it)."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    loss_sums: dict[str, float] = field(default_factory=dict)
    loss_batches: int = 0
    train_seconds: float = 0.0

    def start_clock(self) -> None:
        self._since = time.perf_counter()  # not a field: not saved

    def clock(self) -> float:
        """Adds the time since `start_clock` (or the last call) to ``train_seconds``, and returns it."""
        since = getattr(self, "_since", None)
        if since is not None:
            now = time.perf_counter()
            self.train_seconds += now - since
            self._since = now
        return self.train_seconds

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0
        self.loss_sums, self.loss_batches = {}, 0


class JSONLinesTracker(GeneralTracker):
    """An Accelerate tracker that appends every logged dict as one JSON line: a log that needs no extra package."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        self.log({"config": values}, step=0)

    def log(self, values: dict, step: Optional[int] = None, **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}, default=float) + "\n")

    def truncate_after(self, step: int, open_epoch: Optional[int] = None) -> int:
        """Drop the lines logged after ``step``: what a run that died after its last checkpoint logged before dying,
        which the run resumed from that checkpoint logs again. A torn last line goes too. ``open_epoch``: the epoch a
        mid-epoch checkpoint is in; its end-of-epoch line goes even at ``step`` (a checkpoint at an epoch's last
        batch, then validation logged, then a kill before the epoch's own checkpoint: the resumed run validates and
        logs that epoch again). Returns how many lines were dropped; the file is rewritten atomically."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()

        def kept(line: str) -> bool:
            try:
                entry = json.loads(line)
            except ValueError:
                return False
            at = entry.get("step") or 0
            return at < step or at == step and (open_epoch is None or entry.get("epoch") != open_epoch)

        keep = [line for line in lines if line.strip() and kept(line)]
        if len(keep) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        return len(lines) - len(keep)


class SeededAugmentation(Dataset):
    """A map-style dataset whose sample ``i`` of epoch ``e`` is made under RNGs seeded by ``(seed, e, i)``.

    Random augmentation (timm draws from both ``random`` and ``torch``) then depends neither on the order in which
    samples are loaded nor on the number of workers or processes, nor on where a run was resumed: a resumed run sees
    exactly the augmented images of an uninterrupted one. The caller's RNG states are restored after each sample, so
    the global streams (dropout) advance the same whether or not batches were skipped or loaded ahead. With worker
    processes the epoch reaches the dataset only if the workers are not persistent.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        sample_seed = derived_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def precision_warning(mixed_precision: str, device: torch.device) -> Optional[str]:
    """What to tell a user whose precision does not run where they asked: Accelerate runs fp16 only on accelerators,
    and on a CPU computes in float32 without a word."""
    if mixed_precision == "fp16" and device.type == "cpu":
        return ("fp16 mixed precision does not run on a CPU: Accelerate computes in float32 here "
                "(--mixed-precision bf16 runs on a CPU, and gains where the CPU has native bf16)")
    return None


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from integers (e.g. seed, epoch, batch, process), independent across keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The subset of a batch that the model's forward takes."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "caption_lengths_host" in batch:  # the collator's host copy: the caption LSTM packs without a device sync
        inputs["caption_lengths"] = torch.tensor(batch["caption_lengths_host"], dtype=torch.long)
    return inputs


def select_rows(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The rows of a batch where ``keep`` is true (tensors and lists alike; other values are kept as they are)."""
    index = keep.nonzero().flatten().tolist()
    return {k: v[keep] if torch.is_tensor(v) else [v[i] for i in index] if isinstance(v, list) else v
            for k, v in batch.items()}


def all_images_ok(batch: dict[str, Any]) -> bool:
    """Whether every image of the batch was read, from the collator's host-side flag when there is one (reading the
    ``image_ok`` tensor back from a GPU would make the host wait for the device)."""
    if "all_images_ok" in batch:
        return bool(batch["all_images_ok"])
    return bool(batch["image_ok"].all())


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to zero."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def adamw(param_groups: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """`torch.optim.AdamW`, fused (one kernel over all the parameters instead of a loop over them) where every
    parameter is a floating-point tensor on a device with the fused kernel: the same update, in less time (a few per
    cent of a training step on a 2-core CPU, `benchmarks/SPEED.md`)."""
    param_groups = list(param_groups)
    params = [p for group in param_groups for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(param_groups, fused=fused, **kwargs)


def build_optimizer(model: torch.nn.Module, lr: float, backbone_lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (`adamw`) with the pretrained image backbone on its own (usually lower) rate; no decay on biases and
    norms."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = name.startswith("image_encoder.")
        decay = param.ndim > 1 and "embedding" not in name
        groups.setdefault((backbone, decay), []).append(param)
    return adamw(
        [{"params": params, "lr": backbone_lr if backbone else lr, "weight_decay": weight_decay if decay else 0.0}
         for (backbone, decay), params in groups.items()], lr=lr)


# Rises with the step as 1 - (1 + step) ** -EMA_WARMUP_POWER (timm's warm-up with power 3/4, its choice for runs of
# under a few hundred thousand steps): 0.968 after 100 steps, 0.994 after 1,000, capped at the chosen decay.
EMA_WARMUP_POWER = 0.75
EMA_FILE = "ema.safetensors"


def build_ema(model: torch.nn.Module, decay: float) -> ModelEmaV3:
    """An exponential moving average of ``model``'s weights and buffers (timm's `ModelEmaV3`), updated after each
    optimizer step by `train_one_epoch`. Built from the bare model before ``accelerator.prepare``, then moved to the
    device by the caller. Its decay warms up (``EMA_WARMUP_POWER``), so early averages are not dominated by the random
    initial heads; ``decay`` caps it."""
    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from (a missing, empty or damaged file)."""


MANIFEST = "manifest.json"


class CheckpointManager:
    """Numbered checkpoints under ``run_dir/checkpoints``, pruned to the last ``keep``, in safetensors + JSON: nothing
    is unpickled to resume.

    A checkpoint holds what ``accelerator.prepare`` registered, as ``accelerator.save_state`` would, without its
    pickles: ``model.safetensors``; the optimizer (``optimizer.safetensors`` + ``optimizer.json``), the scheduler
    (``scheduler.json``) and, under fp16, the gradient scaler (``scaler.json``), each a state dict split into its
    tensors and the JSON of the rest; each process's random generators and Accelerate's step (``rng_<process>``);
    with ``ema``, the weight average (``ema.safetensors``). ``manifest.json`` lists every file with its size and
    SHA-256, and holds a copy of ``progress.json``'s content, so a damaged file is found before anything is loaded
    (`problem`).

    It is written into ``.tmp-step_N``, flushed to disk, and renamed to ``step_N`` with ``progress.json`` inside, which
    marks it complete. Saving a step that already has a checkpoint (an epoch's last batch, then the epoch's end) moves
    the old one aside as ``.old-step_N`` first and deletes it only once the new one is in place; a run killed between
    the two renames resumes from ``.old-step_N``. Checkpoints of Accelerate's own format (before the sixteenth
    session) still load, through ``accelerator.load_state`` (its restricted unpickler).
    """

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, keep: int = 3,
                 ema: Optional[ModelEmaV3] = None):
        self.accelerator = accelerator
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.ema = ema
        self._untied: list[torch.nn.Module] = []  # RNN modules given their own weight storage for a legacy load
        accelerator.register_load_state_pre_hook(self._untie_views)

    def save(self, progress: Progress) -> Path:
        """Write a checkpoint; every process must call this (each saves its own random generators).

        Raises:
            CheckpointError: a file could not be written (e.g. the disk is full); the partial checkpoint is removed
                and the earlier ones are intact.
        """
        acc = self.accelerator
        progress.clock()  # the time up to this checkpoint, which the main process saves
        name = f"step_{progress.step:08d}"
        final, tmp, old = self.root / name, self.root / f".tmp-{name}", self.root / f".old-{name}"
        if acc.is_main_process:
            for stale in self.root.glob(".tmp-step_*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.root.glob(".old-step_*"):  # replaced, and left by a kill before it was deleted
                if (self.root / stale.name.removeprefix(".old-") / "progress.json").is_file():
                    shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()  # the stale folders are gone before any process makes its own
        tmp.mkdir(parents=True, exist_ok=True)  # on every machine: several nodes need not share their storage
        try:
            save_training_state(acc, tmp)
            acc.wait_for_everyone()
            if acc.is_main_process:
                if self.ema is not None:  # the same on every process: the main one writes it
                    save_file(_cpu_copies(self.ema.module.state_dict()), str(tmp / EMA_FILE))
                fsync_tree(tmp)
                save_json({**manifest(tmp), "progress": asdict(progress)}, tmp / MANIFEST)
                save_json(asdict(progress), tmp / "progress.json")  # last: it marks the checkpoint complete
        except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            earlier = self.complete(self.root.parent)
            raise CheckpointError(
                f"could not write the checkpoint {final} ({type(error).__name__}: {error}); "
                + (f"the earlier ones are intact: fix the cause (e.g. free disk space) and resume with --resume "
                   f"{self.root.parent}" if earlier else "there is no earlier checkpoint")) from error
        if acc.is_main_process:
            if final.exists():  # moved aside, not deleted, until the new one is in place
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync(self.root)
            shutil.rmtree(old, ignore_errors=True)
            self._prune()
        acc.wait_for_everyone()
        return final

    @staticmethod
    def complete(run_dir: str | Path) -> list[Path]:
        """The run's finished checkpoints (those with ``progress.json``), oldest first; a ``.old-step_N`` stands in
        for a ``step_N`` that a kill mid-save left missing."""
        root = Path(run_dir) / "checkpoints"
        done = {p.name: p for p in root.glob("step_*") if (p / "progress.json").is_file()}
        for p in root.glob(".old-step_*"):
            name = p.name.removeprefix(".old-")
            if name not in done and (p / "progress.json").is_file():
                done[name] = p
        return [done[k] for k in sorted(done)]

    def _prune(self) -> None:
        done = self.complete(self.root.parent)
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def latest(run_dir: str | Path) -> Optional[Path]:
        done = CheckpointManager.complete(run_dir)
        return done[-1] if done else None

    @staticmethod
    def problem(checkpoint: str | Path, processes: int = 1, ema: bool = False) -> Optional[str]:
        """Why ``checkpoint`` cannot be resumed from, or None: a file missing, or differing in size or SHA-256 from
        its manifest; ``progress.json`` unreadable or differing from the manifest's copy of it. Checkpoints of
        Accelerate's format (no manifest): a file missing or empty, a safetensors file shorter than its header says, a
        pickle archive failing its checksums. Reads every file through; loads nothing."""
        checkpoint = Path(checkpoint)
        legacy = not (checkpoint / MANIFEST).is_file() and any(
            (checkpoint / name).is_file() for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"))
        # optimizer.safetensors is absent where no step has run yet (an empty AdamW state): the manifest lists it
        required = ["progress.json", "model.safetensors",
                    *(["optimizer.bin", "scheduler.bin", *(f"random_states_{i}.pkl" for i in range(processes))]
                      if legacy else [MANIFEST, "optimizer.json", "scheduler.json",
                                      *(f"rng_{i}.json" for i in range(processes))]),
                    *([EMA_FILE] if ema else [])]
        for name in required:
            path = checkpoint / name
            if not path.is_file() or path.stat().st_size == 0:
                return f"{name} is {'empty' if path.is_file() else 'missing'}"
        try:
            Progress(**json.loads((checkpoint / "progress.json").read_text()))
        except (ValueError, TypeError) as error:
            return f"progress.json is unreadable ({error})"
        return _legacy_problem(checkpoint) if legacy else _manifest_problem(checkpoint)

    def load(self, checkpoint: str | Path) -> Progress:
        checkpoint = Path(checkpoint)
        if (checkpoint / MANIFEST).is_file():
            load_training_state(self.accelerator, checkpoint)
        else:  # Accelerate's format, written before the sixteenth session
            try:
                self.accelerator.load_state(str(checkpoint))
            finally:  # back to one flat weight buffer per RNN (cuDNN's fast path); a no-op on a CPU
                for module in self._untied:
                    module.flatten_parameters()
                self._untied = []
        if self.ema is not None:
            path = checkpoint / EMA_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{checkpoint}: no {EMA_FILE}, though the run averages its weights "
                                        "(--ema-decay)")
            self.ema.module.load_state_dict(load_file(str(path)))  # copied onto the average's device
        return Progress(**json.loads((checkpoint / "progress.json").read_text()))

    def _untie_views(self, models: list[torch.nn.Module], input_dir: str) -> None:
        """Accelerate's load-state pre-hook, for checkpoints of its format: on a GPU, cuDNN keeps each nn.LSTM's
        weights as views of one flat buffer, which safetensors' `load_model` refuses; they get their own storage
        while the checkpoint loads (`load` flattens them again once it is in)."""
        for model in models:
            for module in model.modules():
                if isinstance(module, torch.nn.RNNBase):
                    params = list(module.parameters(recurse=False))
                    if any(not _covers_storage(p) for p in params):
                        for p in params:
                            p.data = p.data.clone()
                        self._untied.append(module)


def _covers_storage(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is its whole storage (not a part of a larger buffer)."""
    return tensor.storage_offset() == 0 and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()


# The training state as safetensors + JSON. A state dict (nested dicts, lists and tuples of tensors, numbers, strings,
# booleans and None) becomes a JSON tree in which each tensor is replaced by {"tensor": key}, and a safetensors file of
# those tensors under their keys; dicts are kept as [key, value] pairs, so integer keys (an optimizer's parameter
# indices) stay integers, and tuples stay tuples.


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage, as safetensors writes it: a view of a flat buffer (cuDNN's LSTM
    weights) or of another tensor is copied, not refused as shared."""
    return tensor.detach().cpu().clone().contiguous()


def _cpu_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: _cpu_copy(v) for k, v in state.items()}


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if torch.is_tensor(value):
        if key in tensors:  # keys joined by "." can meet ({"a.b": x} and {"a": {"b": y}}); never silently
            raise ValueError(f"two tensors of a state dict would both be stored as {key!r}")
        tensors[key] = _cpu_copy(value)
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _split_tensors(v, tensors, f"{key}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_split_tensors(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: a {type(value).__name__} cannot be checkpointed as safetensors + JSON")


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "dict" in value:
            return {k: _join_tensors(v, tensors) for k, v in value["dict"]}
        if "tuple" in value:
            return tuple(_join_tensors(v, tensors) for v in value["tuple"])
        return [_join_tensors(v, tensors) for v in value["list"]]
    return value


def save_state_dict(state: Any, folder: Path, name: str) -> None:
    """``name.json`` (the tree) and, where it holds tensors, ``name.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _split_tensors(state, tensors, name)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    save_json({"tree": tree}, folder / f"{name}.json")


def load_state_dict(folder: Path, name: str) -> Any:
    tree = json.loads((folder / f"{name}.json").read_text())["tree"]
    path = folder / f"{name}.safetensors"
    return _join_tensors(tree, load_file(str(path)) if path.is_file() else {})


def _numbered(name: str, index: int) -> str:
    return name if index == 0 else f"{name}_{index}"


def rng_state(step: int) -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch, CUDA) and Accelerate's step counter."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"step": step, "python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> int:
    """Restores `rng_state`; returns the step counter."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return int(state["step"])


def save_training_state(acc: Accelerator, folder: Path) -> None:
    """What ``accelerator.save_state`` saves, as safetensors + JSON (see `CheckpointManager`): every process its
    random generators, the main process the prepared models, optimizers, schedulers and gradient scaler."""
    weights = [acc.get_state_dict(model) for model in acc._models]  # on every process (a collective under FSDP)
    if acc.is_main_process:
        for i, state in enumerate(weights):
            save_file(_cpu_copies(state), str(folder / f"{_numbered('model', i)}.safetensors"),
                      metadata={"format": "pt"})
        for i, optimizer in enumerate(acc._optimizers):
            save_state_dict(optimizer.state_dict(), folder, _numbered("optimizer", i))
        for i, scheduler in enumerate(acc._schedulers):
            save_state_dict(scheduler.state_dict(), folder, _numbered("scheduler", i))
        if acc.scaler is not None:
            save_state_dict(acc.scaler.state_dict(), folder, "scaler")
    save_state_dict(rng_state(acc.step), folder, f"rng_{acc.process_index}")


def load_training_state(acc: Accelerator, folder: Path) -> None:
    """Restores `save_training_state` into the prepared objects, and this process's generators and step."""
    for i, model in enumerate(acc._models):
        acc.unwrap_model(model).load_state_dict(load_file(str(folder / f"{_numbered('model', i)}.safetensors")))
    for i, optimizer in enumerate(acc._optimizers):
        optimizer.load_state_dict(load_state_dict(folder, _numbered("optimizer", i)))
        _match_parameter_layouts(optimizer)
    for i, scheduler in enumerate(acc._schedulers):
        scheduler.load_state_dict(load_state_dict(folder, _numbered("scheduler", i)))
    if acc.scaler is not None:
        acc.scaler.load_state_dict(load_state_dict(folder, "scaler"))
    acc.step = set_rng_state(load_state_dict(folder, f"rng_{acc.process_index}"))


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Gives each optimizer state tensor (AdamW's moments) its parameter's memory layout. Safetensors stores tensors
    contiguous, so the moments of a ``channels_last`` convolution come back in the default layout, and the update
    would then not repeat the uninterrupted run's bit for bit."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def manifest(folder: Path) -> dict[str, Any]:
    """Every file of a checkpoint with its size and SHA-256."""
    return {"files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                      for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (MANIFEST, "progress.json")}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_problem(checkpoint: Path) -> Optional[str]:
    try:
        written = json.loads((checkpoint / MANIFEST).read_text())
        files = written["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    # progress.json is written after the manifest (it marks the checkpoint complete), so the manifest holds a copy of
    # its content rather than its digest; manifests of the seventeenth session have none
    if "progress" in written and json.loads((checkpoint / "progress.json").read_text()) != written["progress"]:
        return "progress.json is damaged (it differs from the copy in manifest.json)"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} is damaged ({path.stat().st_size} bytes, {expected['bytes']} written)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} is damaged (its SHA-256 differs from the one written)"
    return None


def _legacy_problem(checkpoint: Path) -> Optional[str]:
    import zipfile

    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors" and not _safetensors_complete(path):
            return f"{path.name} is cut short"
        if path.suffix in (".bin", ".pkl"):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                return f"{path.name} is damaged ({error})"
            if bad is not None:
                return f"{path.name} is damaged (its member {bad} fails its checksum)"
    return None


def _safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file holds its whole header and every byte its header's tensor offsets point to."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return False
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return False
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return 8 + length + end <= size


def find_checkpoints(resume: str, runs_root: str | Path = "runs") -> tuple[Path, list[Path]]:
    """The run folder of ``--resume`` (a checkpoint, a run folder or ``latest``) and the checkpoints to try, newest
    first: the one named, or every complete one of the run folder.

    Raises:
        FileNotFoundError: nothing to resume there.
    """
    path = Path(resume)
    if resume == "latest":  # follow the link now: a run started later would move it
        link = Path(runs_root) / "latest"
        if not link.exists():
            raise FileNotFoundError(f"--resume latest: {link} does not exist (no run to resume)")
        path = link.parent / os.readlink(link) if link.is_symlink() else link
    if (path / "progress.json").is_file():
        return path.parent.parent, [path]
    if (path / "checkpoints").is_dir():
        candidates = CheckpointManager.complete(path)[::-1]
        if not candidates:
            raise FileNotFoundError(f"--resume {resume}: run folder {path} has no complete checkpoint yet")
        return path, candidates
    if (path / "run_config.json").is_file():  # a run stopped before its first checkpoint
        raise FileNotFoundError(f"--resume {resume}: run folder {path} has no complete checkpoint yet")
    raise FileNotFoundError(f"--resume {resume}: {path} is neither a checkpoint (progress.json) nor a run folder")


def usable_checkpoint(resume: str, run_dir: Path, candidates: list[Path]) -> Path:
    """The first of ``candidates`` without a `CheckpointManager.problem` (checked for the number of processes and the
    weight average that the run's ``run_config.json`` records): a damaged newest checkpoint of a run folder is skipped
    with a warning for the one before it; a damaged checkpoint named directly is refused.

    Raises:
        CheckpointError: no usable checkpoint.
    """
    try:
        config = json.loads((run_dir / "run_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    processes = config.get("num_processes") or 1
    ema = bool(config.get("args", {}).get("ema_decay"))
    skipped = []
    for candidate in candidates:
        problem = CheckpointManager.problem(candidate, processes, ema)
        if problem is None:
            if skipped:
                logger.warning("--resume %s: skipped the damaged checkpoint(s) %s; resuming from %s", resume,
                               "; ".join(skipped), candidate.name)
            return candidate
        skipped.append(f"{candidate.name} ({problem})")
    hint = (f"; resume the run folder ({run_dir}) to fall back to an earlier checkpoint"
            if len(candidates) == 1 and len(CheckpointManager.complete(run_dir)) > 1 else "")
    raise CheckpointError(f"--resume {resume}: no usable checkpoint: {'; '.join(skipped)}{hint}")


def resolve_checkpoint(resume: str, runs_root: str | Path = "runs") -> Path:
    """The checkpoint folder that ``--resume`` continues from (`find_checkpoints`, then `usable_checkpoint`)."""
    return usable_checkpoint(resume, *find_checkpoints(resume, runs_root))


def train_one_epoch(model: torch.nn.Module, loader: Iterable, criterion: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, accelerator: Accelerator, progress: Progress,
                    *, total_batches: int, max_steps: Optional[int] = None, max_grad_norm: float = 1.0,
                    log_every: int = 10, checkpoint_every: int = 0,
                    checkpoints: Optional[CheckpointManager] = None,
                    on_checkpoint: Optional[Callable[[Progress], None]] = None,
                    bad_images: Optional[list[str]] = None, use_image: bool = True,
                    frozen: Iterable[torch.nn.Module] = (), seen_ids: Optional[list[str]] = None,
                    batch_transform: Optional[Callable[..., torch.Tensor]] = None,
                    augment_seed: int = 0,
                    prepare: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
                    ema: Optional[ModelEmaV3] = None) -> dict[str, float]:
    """One pass over ``loader`` (which may start mid-epoch: ``progress.batches_done`` batches were skipped).

    ``frozen`` modules stay in eval mode (their batch-norm statistics do not move); ``seen_ids`` collects the image
    ids this process trained on, and ``bad_images`` the ids of unreadable images that were dropped from batches.
    ``batch_transform`` (e.g. `images.BatchImageTransform` in training mode) turns the batch's uint8 images into the
    model's input where the batch is, on the device; it draws from a generator seeded by ``(augment_seed, epoch,
    batch, process)``, so a resumed run sees the augmented images of an uninterrupted one. ``prepare`` maps each
    batch first (e.g. `data.decode_images`: image files decoded on the device). ``ema`` (`build_ema`) is updated
    after every optimizer step that was not skipped (fp16's overflow), before that step's checkpoint.

    Returns:
        The mean of each loss term over the epoch's batches (those before a resume included, from ``progress``).
    """
    model.train()
    for module in frozen:
        module.eval()
    # Summed where they are (read back once per epoch and per checkpoint, not once per batch), continuing the sums
    # of the batches before a resume.
    sums = {k: torch.tensor(v, device=accelerator.device) for k, v in progress.loss_sums.items()}
    count = progress.loss_batches
    bar = tqdm(total=total_batches, initial=progress.batches_done, desc=f"epoch {progress.epoch}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True, leave=False)
    seen, t0 = 0, time.perf_counter()
    # Accelerate divides each loss by --grad-accum; the epoch's last window may be shorter (it steps at the loader's
    # end): its losses are scaled up to give the mean gradient of its batches, as every other window does.
    accum = accelerator.gradient_accumulation_steps
    short = total_batches % accum  # batches in the last window, when it is shorter
    try:  # on an error too: a bar left open would swallow the start of the error message's line
        for batch in loader:
            if prepare is not None:
                batch = prepare(batch)
            all_bad = False
            if use_image and "image_ok" in batch and not all_images_ok(batch):
                if bad_images is not None:
                    bad_images.extend(i for i, ok in zip(batch["image_id"], batch["image_ok"].tolist()) if not ok)
                if bool(batch["image_ok"].any()):
                    batch = select_rows(batch, batch["image_ok"]) | {"all_images_ok": True}
                else:  # every image unreadable: a zero-weight step keeps the processes (and their all-reduces) in step
                    all_bad = True
            if seen_ids is not None and not all_bad:
                seen_ids.extend(batch["image_id"])
            if batch_transform is not None and "image" in batch:
                generator = torch.Generator(device=batch["image"].device).manual_seed(derived_seed(
                    augment_seed, progress.epoch, progress.batches_done, accelerator.process_index))
                batch["image"] = batch_transform(batch["image"], generator=generator)
            with accelerator.accumulate(model):
                outputs = model(**model_inputs(batch), label_seq=batch.get("label_seq"))
                terms = criterion(outputs, batch["targets"], batch.get("label_seq"))
                loss = terms["loss"] * 0.0 if all_bad else terms["loss"]
                if short and progress.batches_done >= total_batches - short:
                    loss = loss * (accum / short)
                terms = {k: v.detach() for k, v in terms.items()}
                accelerator.backward(loss)
                # The one value read back per step, after the backward pass is queued (the host then waits for the
                # forward and backward together) and before the optimizer step (the weights are still those of the
                # last good step). All processes stop together.
                finite = torch.isfinite(loss.detach()).float().reshape(1)
                if accelerator.num_processes > 1:
                    finite = accelerator.gather(finite).min().reshape(1)
                if not bool(finite.item()):
                    raise FloatingPointError(
                        f"non-finite loss at step {progress.step + 1} (epoch {progress.epoch}, batch "
                        f"{progress.batches_done}; this process's loss terms: "
                        f"{', '.join(f'{k}={float(v):.4g}' for k, v in terms.items())}): lower --lr, or check the data")
                if accelerator.sync_gradients and max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batches_done += 1
            if not all_bad:
                seen += len(batch["targets"])
                count += 1
                for k, v in terms.items():
                    sums[k] = sums[k] + v if k in sums else v.clone()
            if accelerator.sync_gradients:
                progress.step += 1
                # A step that fp16's gradient scaler skipped (overflow) left the weights and the rate (Accelerate's
                # scheduler) as they were: the average stays too
                if ema is not None and not accelerator.optimizer_step_was_skipped:
                    ema.update(accelerator.unwrap_model(model), step=progress.step)
                if progress.step % log_every == 0:  # reading values back waits for the device: only when logging
                    rate = seen * accelerator.num_processes / max(1e-9, time.perf_counter() - t0)
                    values = {k: float(v) for k, v in terms.items()}
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.1f}")
                    accelerator.log({f"train/{k}": v for k, v in values.items()}
                                    | {"train/lr": scheduler.get_last_lr()[-1], "train/images_per_s": rate},
                                    step=progress.step)
                stop = max_steps is not None and progress.step >= max_steps
                # --max-steps in mid-epoch checkpoints too (at an epoch's last batch the epoch's end does), so that
                # the stopped run can be resumed (e.g. to validate and export it again)
                if checkpoints is not None and (
                        checkpoint_every > 0 and progress.step % checkpoint_every == 0
                        or stop and progress.batches_done < total_batches):
                    progress.loss_sums, progress.loss_batches = {k: float(v) for k, v in sums.items()}, count
                    checkpoints.save(progress)
                    if on_checkpoint is not None:
                        on_checkpoint(progress)
                if stop:
                    bar.update(1)
                    break
            bar.update(1)
    finally:
        bar.close()
    return {k: float(v) / max(1, count) for k, v in sums.items()}


@torch.inference_mode()
def collect_predictions(model: torch.nn.Module, loader: Iterable, accelerator: Accelerator,
                        with_decoder: bool = True, bad_images: Optional[list[str]] = None,
                        prepare: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None) -> dict[str, np.ndarray]:
    """Probabilities of every output over a labelled loader, gathered across processes exactly once per sample.

    ``bad_images`` collects the ids of this process's unreadable images (blank images with ``skip_bad_images``);
    ``prepare`` maps each batch first (e.g. `data.decode_images` with the evaluation transform).

    Returns:
        ``targets`` and, per output that exists, ``image``/``caption``/``fused``/``decoder``/``final`` [N, C]
        probabilities, plus ``index`` (dataset rows), in dataset order. A row whose image could not be read has NaN
        probabilities in every output that needs the image, ``final`` included unless the model predicts it from the
        caption alone (as predict.py leaves such a row without labels, or predicts it from its caption); `evaluate`
        scores each output on its other rows.
    """
    model.eval()
    core = accelerator.unwrap_model(model)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        if prepare is not None:
            batch = prepare(batch)
        missing = "image_ok" in batch and not all_images_ok(batch)
        if bad_images is not None and missing:
            bad_images.extend(i for i, ok in zip(batch["image_id"], batch["image_ok"].tolist()) if not ok)
        # The final output of an unreadable image is its caption's, as predict.py gives it.
        image_ok = batch["image_ok"] if missing and core.predicts_without_image else None
        inputs = model_inputs(batch)
        with accelerator.autocast():  # a model that was not prepared (a weight average) runs in the run's precision
            outputs = model(**inputs)
            probs = {name: torch.sigmoid(outputs[f"{name}_logits"].float())
                     for name in ("image", "caption", "fused") if f"{name}_logits" in outputs}
            if with_decoder and core.label_decoder is not None:
                probs["decoder"] = core.decode(**inputs, outputs=outputs)[1].float()
            probs["final"] = core.predict_proba(**inputs, outputs=outputs, decoder_scores=probs.get("decoder"),
                                                image_ok=image_ok).float()
        if missing:  # what was computed from a blank image is no prediction
            lost = ~batch["image_ok"].bool()
            for name in ("image", "fused", "decoder", *(("final",) if image_ok is None else ())):
                if name in probs:
                    probs[name][lost] = float("nan")
        probs["targets"] = batch["targets"].float()
        probs["index"] = batch["index"]
        gathered = accelerator.gather_for_metrics(probs)
        for k, v in gathered.items():
            parts.setdefault(k, []).append(v.cpu().numpy())
    result = {k: np.concatenate(v) for k, v in parts.items()}
    if "index" in result:  # dataset order, whatever the sharding
        order = np.argsort(result["index"], kind="stable")
        result = {k: v[order] for k, v in result.items()}
    return result


def predicted_rows(probs: np.ndarray) -> np.ndarray:
    """The rows of an output of `collect_predictions` that were predicted (not NaN: their image could be read)."""
    return ~np.isnan(probs).any(axis=1)


def evaluate(predictions: dict[str, np.ndarray], thresholds: Any = 0.5) -> dict[str, dict[str, Any]]:
    """Metrics for every output in ``predictions`` (see `collect_predictions`), each on the rows it predicted (all
    but those whose image is unreadable, for an output that needs the image); an output that predicted no row is
    left out."""
    targets = predictions["targets"]
    metrics = {}
    for name, probs in predictions.items():
        rows = predicted_rows(probs) if name not in ("targets", "index") else None
        if rows is not None and rows.any():
            metrics[name] = compute_metrics(probs[rows], targets[rows], thresholds if name == "final" else 0.5)
    return metrics
