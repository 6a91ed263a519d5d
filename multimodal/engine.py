"""Training and evaluation loops under Accelerate, and the checkpoints that make a run resumable.

Accelerate owns devices, mixed precision and distribution: there is no hand-written autocast, GradScaler or DDP code
here. A checkpoint is `accelerator.save_state` (model, optimizer, scheduler, RNG and sampler states) plus
``progress.json`` (epoch, batches done in that epoch, global step) and, with a weight average (`build_ema`),
``ema.safetensors``, written into a temporary folder that is renamed into place only when complete, so a crash
never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
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

from .config import save_json
from .metrics import compute_metrics

MODEL_INPUTS = ("image", "caption_ids", "caption_lengths", "image_features")


@dataclass
class Progress:
    """Where a run is: ``batches_done`` batches of epoch ``epoch`` are behind us, ``step`` optimizer steps in all."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0


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

    def truncate_after(self, step: int) -> int:
        """Drop the lines logged after ``step``: what a run that died after its last checkpoint logged before dying,
        which the run resumed from that checkpoint logs again. A torn last line goes too. Returns how many lines
        were dropped; the file is rewritten atomically."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()

        def kept(line: str) -> bool:
            try:
                return (json.loads(line).get("step") or 0) <= step
            except ValueError:
                return False

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


class CheckpointManager:
    """Numbered checkpoints under ``run_dir/checkpoints``: atomic, pruned to the last ``keep``. With ``ema`` its
    averaged weights are saved and restored beside the model's (``ema.safetensors``)."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, keep: int = 3,
                 ema: Optional[ModelEmaV3] = None):
        self.accelerator = accelerator
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.ema = ema
        self._untied: list[torch.nn.Module] = []  # RNN modules given their own weight storage for a load
        accelerator.register_save_state_pre_hook(self._save_views_whole)
        accelerator.register_load_state_pre_hook(self._untie_views)

    def save(self, progress: Progress) -> Path:
        """Write a checkpoint; every process must call this (each saves its own RNG state)."""
        acc = self.accelerator
        final = self.root / f"step_{progress.step:08d}"
        tmp = self.root / f".tmp-step_{progress.step:08d}"
        if acc.is_main_process:
            for stale in self.root.glob(".tmp-step_*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.ema is not None:  # the same on every process: the main one writes it. Copies: no shared storage
                save_file({k: v.detach().contiguous().cpu().clone() for k, v in self.ema.module.state_dict().items()},
                          str(tmp / EMA_FILE))
            save_json(asdict(progress), tmp / "progress.json")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    @staticmethod
    def complete(run_dir: str | Path) -> list[Path]:
        """The run's finished checkpoints (those with ``progress.json``), oldest first."""
        return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / "progress.json").is_file())

    def _prune(self) -> None:
        done = self.complete(self.root.parent)
        for old in done[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def latest(run_dir: str | Path) -> Optional[Path]:
        done = CheckpointManager.complete(run_dir)
        return done[-1] if done else None

    def load(self, checkpoint: str | Path) -> Progress:
        try:
            self.accelerator.load_state(str(checkpoint))
        finally:  # back to one flat weight buffer per RNN (cuDNN's fast path); a no-op on a CPU
            for module in self._untied:
                module.flatten_parameters()
            self._untied = []
        if self.ema is not None:
            path = Path(checkpoint) / EMA_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{checkpoint}: no {EMA_FILE}, though the run averages its weights "
                                        "(--ema-decay)")
            self.ema.module.load_state_dict(load_file(str(path)))  # copied onto the average's device
        return Progress(**json.loads((Path(checkpoint) / "progress.json").read_text()))

    # On a GPU, cuDNN keeps each nn.LSTM's weights as views of one flat buffer (`flatten_parameters`). Accelerate
    # writes a state dict to safetensors after dropping all but one name per shared storage, which would lose all but
    # one weight of every LSTM; safetensors' `load_model` refuses a model whose tensors are partial views of a shared
    # storage. So partial views are saved as copies, and RNN weights get their own storage while a checkpoint loads.

    @staticmethod
    def _save_views_whole(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        """Accelerate's save-state pre-hook: every tensor that is a partial view of a storage shared with another
        entry is replaced by a copy in the state dicts about to be written (tensors tied whole stay tied)."""
        for state in weights:
            by_storage: dict[tuple[str, int], list[str]] = {}
            for name, value in state.items():
                if torch.is_tensor(value) and value.device.type != "meta":
                    by_storage.setdefault((str(value.device), value.untyped_storage().data_ptr()), []).append(name)
            for names in by_storage.values():
                if len(names) > 1:
                    for name in names:
                        if not _covers_storage(state[name]):
                            state[name] = state[name].detach().clone()

    def _untie_views(self, models: list[torch.nn.Module], input_dir: str) -> None:
        """Accelerate's load-state pre-hook: RNN weights that are views of a flat buffer get their own storage
        (`load` flattens them again once the checkpoint is in)."""
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


def resolve_checkpoint(resume: str, runs_root: str | Path = "runs") -> Path:
    """A checkpoint folder from ``--resume``: a checkpoint, a run folder (its newest checkpoint) or ``latest``."""
    path = Path(resume)
    if resume == "latest":  # follow the link now: a run started later would move it
        link = Path(runs_root) / "latest"
        if not link.exists():
            raise FileNotFoundError(f"--resume latest: {link} does not exist (no run to resume)")
        path = link.parent / os.readlink(link) if link.is_symlink() else link
    if (path / "progress.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = CheckpointManager.latest(path)
        if found is not None:
            return found
        raise FileNotFoundError(f"--resume {resume}: run folder {path} has no complete checkpoint yet")
    raise FileNotFoundError(f"--resume {resume}: {path} is neither a checkpoint (progress.json) nor a run folder")


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
    after every optimizer step, before that step's checkpoint.

    Returns:
        The mean of each loss term over the batches of this call.
    """
    model.train()
    for module in frozen:
        module.eval()
    sums: dict[str, float] = {}
    count = 0
    bar = tqdm(total=total_batches, initial=progress.batches_done, desc=f"epoch {progress.epoch}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True, leave=False)
    seen, t0 = 0, time.perf_counter()
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
                for k, v in terms.items():  # summed where they are: read back once per epoch, not once per batch
                    sums[k] = sums[k] + v if k in sums else v.clone()
            if accelerator.sync_gradients:
                progress.step += 1
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=progress.step)
                if progress.step % log_every == 0:  # reading values back waits for the device: only when logging
                    rate = seen * accelerator.num_processes / max(1e-9, time.perf_counter() - t0)
                    values = {k: float(v) for k, v in terms.items()}
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.1f}")
                    accelerator.log({f"train/{k}": v for k, v in values.items()}
                                    | {"train/lr": scheduler.get_last_lr()[-1], "train/images_per_s": rate},
                                    step=progress.step)
                if checkpoints is not None and checkpoint_every > 0 and progress.step % checkpoint_every == 0:
                    checkpoints.save(progress)
                    if on_checkpoint is not None:
                        on_checkpoint(progress)
                if max_steps is not None and progress.step >= max_steps:
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
        probabilities, plus ``index`` (dataset rows), in dataset order.
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
        image_ok = (batch["image_ok"] if missing and core.image_encoder is not None and core.caption_encoder is not None
                    else None)
        inputs = model_inputs(batch)
        with accelerator.autocast():  # a model that was not prepared (a weight average) runs in the run's precision
            outputs = model(**inputs)
            probs = {name: torch.sigmoid(outputs[f"{name}_logits"].float())
                     for name in ("image", "caption", "fused") if f"{name}_logits" in outputs}
            if with_decoder and core.label_decoder is not None:
                probs["decoder"] = core.decode(**inputs, outputs=outputs)[1].float()
            probs["final"] = core.predict_proba(**inputs, outputs=outputs, decoder_scores=probs.get("decoder"),
                                                image_ok=image_ok).float()
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


def evaluate(predictions: dict[str, np.ndarray], thresholds: Any = 0.5) -> dict[str, dict[str, Any]]:
    """Metrics for every output in ``predictions`` (see `collect_predictions`)."""
    targets = predictions["targets"]
    return {name: compute_metrics(probs, targets, thresholds if name == "final" else 0.5)
            for name, probs in predictions.items() if name not in ("targets", "index")}
