"""Checkpoints of a model whose LSTM weights are views of one flat buffer, as cuDNN keeps them on a GPU.

On a GPU `nn.LSTM.flatten_parameters` makes every weight of an LSTM a view of one buffer. Accelerate's safetensors
checkpoint used to keep one name per shared storage (losing all other LSTM weights: seen on an H200, `benchmarks/
results/gpu-recipe-h200.log`), and safetensors refused to load into such a model. These tests build that layout on
the CPU, where `flatten_parameters` does nothing, and check that every weight survives a save and a load.
"""
from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from multimodal.config import LossConfig, ModelConfig
from multimodal.engine import CheckpointManager, Progress, build_ema, build_optimizer, train_one_epoch
from multimodal.losses import JointLoss
from multimodal.model import MultimodalClassifier

C, VOCAB = 4, 20


def flatten_like_cudnn(model: torch.nn.Module) -> int:
    """Make each LSTM's weights views of one flat buffer, as `flatten_parameters` does with cuDNN; returns how many
    LSTMs were flattened."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase):
            params = list(module.parameters(recurse=False))
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            offset = 0
            for p in params:
                p.data = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
            count += 1
    return count


def make_model(seed: int) -> MultimodalClassifier:
    torch.manual_seed(seed)
    config = ModelConfig(num_labels=C, image_encoder=None, vocab_size=VOCAB, word_dim=8, caption_hidden=8,
                         label_embed_dim=8, decoder_hidden=16, max_labels=3, use_decoder=True)
    return MultimodalClassifier(config)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, acc: Accelerator) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (4, 5), generator=g)
    targets = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]])
    label_seq = torch.tensor([[0, 3, C], [1, C, -100], [2, C, -100], [0, 1, C]])
    outputs = model(caption_ids=ids, caption_lengths=torch.tensor([5, 3, 2, 4]), label_seq=label_seq)
    acc.backward(JointLoss(LossConfig())(outputs, targets, label_seq)["loss"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def prepared(seed: int) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
    acc = Accelerator(cpu=True)
    model = make_model(seed)
    assert flatten_like_cudnn(model) == 2  # the caption LSTM and the decoder LSTM
    optimizer = build_optimizer(model, 1e-2, 1e-2, 0.0)
    model, optimizer = acc.prepare(model, optimizer)
    return acc, model, optimizer


def test_checkpoint_of_flattened_lstm_weights_keeps_and_restores_every_weight(tmp_path: Path) -> None:
    acc, model, optimizer = prepared(seed=0)
    train_step(model, optimizer, acc)  # optimizer state to restore too
    saved = CheckpointManager(acc, tmp_path).save(Progress(epoch=0, batches_done=1, step=1))
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}

    on_disk = load_file(str(saved / "model.safetensors"))
    assert sorted(on_disk) == sorted(expected)  # no LSTM weight dropped as a "shared tensor"
    for name, value in expected.items():
        assert torch.equal(on_disk[name], value), name

    acc2, model2, optimizer2 = prepared(seed=1)  # other weights, flattened the same way
    assert not torch.equal(model2.caption_encoder.lstm.weight_hh_l0, model.caption_encoder.lstm.weight_hh_l0)
    progress = CheckpointManager(acc2, tmp_path).load(saved)
    assert progress.step == 1
    for name, value in model2.state_dict().items():
        assert torch.equal(value, expected[name]), name

    # the restored run continues exactly as the saved one does (weights and AdamW state both restored); both draw
    # the same dropout masks (the two runs share this process's random generator)
    for m, opt, a in ((model, optimizer, acc), (model2, optimizer2, acc2)):
        torch.manual_seed(5)
        train_step(m, opt, a)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("processes", [1, 2])
def test_an_image_error_in_training_names_the_command_that_continues_the_real_run(tmp_path: Path, caplog,
                                                                                 processes: int) -> None:
    from multimodal.images import ImageLoadError
    from multimodal.training import resume_hint_on_image_error

    run_dir = tmp_path / "runs" / "20261128-000000"
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002" / "progress.json").write_text("{}")
    (tmp_path / "runs" / "latest").symlink_to(run_dir.name)
    for error in (ImageLoadError("x.jpg", "cannot decode image"),  # read in this process, or in a loader worker:
                  RuntimeError("Caught ImageLoadError in DataLoader worker process 0.\nOriginal Traceback ...")):
        caplog.clear()
        with pytest.raises(type(error)), caplog.at_level("WARNING"):
            with resume_hint_on_image_error(tmp_path / "runs" / "latest", processes):  # resumed via runs/latest
                raise error
        command = f"python train.py --resume {run_dir} --skip-bad-images"  # the run, not the link the next run moves
        if processes > 1:
            command = f"accelerate launch --num_processes 2 ... train.py --resume {run_dir} --skip-bad-images"
        assert f"`{command}` continues from the last one without it" in caplog.text
    caplog.clear()
    with pytest.raises(RuntimeError), caplog.at_level("WARNING"):  # any other error: no hint
        with resume_hint_on_image_error(run_dir, processes):
            raise RuntimeError("CUDA out of memory")
    assert "resume" not in caplog.text


@pytest.mark.parametrize("processes", [1, 2])
def test_an_interrupted_run_names_the_command_that_continues_it(tmp_path: Path, monkeypatch, processes: int) -> None:
    """Ctrl-C or SIGTERM: the hint named `python train.py --resume latest` for a default run folder (another run
    moves the link, and a run stopped before its folder existed is not the one it names), plain `python` for a run of
    several processes (refused: it needs their number), and checkpoints where there were none."""
    from multimodal import training

    run_dir = tmp_path / "runs" / "20261128-000000"
    run_dir.mkdir(parents=True)
    (tmp_path / "runs" / "latest").symlink_to(run_dir.name)
    monkeypatch.setattr(training, "_THIS_RUN", {"processes": processes})
    launcher = f"accelerate launch --num_processes {processes} ... " if processes > 1 else "python "
    assert training.interrupt_hint(None) == "the run stopped before it was set up: nothing to resume"
    assert training.interrupt_hint("r") == (f"the run's complete checkpoints are kept; `{launcher}train.py --resume "
                                            "r` continues from the last one")  # resumed, stopped before main knew
    training._THIS_RUN["run_dir"] = tmp_path / "runs" / "latest"
    assert training.interrupt_hint(None) == ("the run stopped before its first checkpoint: nothing to resume (run the "
                                             "command again to start over)")
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002" / "progress.json").write_text("{}")
    assert training.interrupt_hint("latest") == (f"the run's complete checkpoints are kept; `{launcher}train.py "
                                                 f"--resume {run_dir}` continues from the last one")


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, and no `except Exception` catches it."""


def saved_run(tmp_path: Path, steps: tuple[int, ...] = (2, 4), processes: int = 1
              ) -> tuple[Path, CheckpointManager]:
    """A run folder with a checkpoint at each of ``steps`` (model, AdamW, scheduler and RNG states, as train.py
    writes them) and the ``run_config.json`` that resume reads."""
    import json

    acc, model, optimizer = prepared(seed=0)
    scheduler = acc.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    assert scheduler is not None
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps({"args": {}, "num_processes": processes}))
    manager = CheckpointManager(acc, run_dir, keep=5)
    for step in steps:
        train_step(model, optimizer, acc)
        manager.save(Progress(epoch=0, batches_done=step, step=step))
    return run_dir, manager


def test_saving_a_step_again_never_leaves_it_without_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """An epoch's last batch and the epoch's end save the same step. A kill between moving the old checkpoint aside
    and renaming the new one in resumes from the old one (it used to be deleted first: nothing left of that step)."""
    from multimodal import engine
    from multimodal.engine import resolve_checkpoint

    run_dir, manager = saved_run(tmp_path)
    checkpoints = run_dir / "checkpoints"
    real_replace, calls = engine.os.replace, []

    def replace_then_die(src, dst):
        if Path(dst).parent == checkpoints:  # the checkpoints' own renames, not their files'
            calls.append(Path(dst).name)
            if len(calls) == 2:  # the new checkpoint's rename into place
                raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(engine.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        manager.save(Progress(epoch=1, batches_done=0, step=4))
    monkeypatch.undo()
    assert calls[0] == ".old-step_00000004" and not (checkpoints / "step_00000004").exists()
    assert [p.name for p in CheckpointManager.complete(run_dir)] == ["step_00000002", ".old-step_00000004"]
    assert resolve_checkpoint(str(run_dir)) == checkpoints / ".old-step_00000004"
    assert manager.load(checkpoints / ".old-step_00000004").step == 4

    manager.save(Progress(epoch=1, batches_done=0, step=4))  # the same save again, uninterrupted
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    # A kill after the new checkpoint's rename but before the old one's deletion: the next save removes it.
    shutil.copytree(checkpoints / "step_00000004", checkpoints / ".old-step_00000004")
    assert CheckpointManager.complete(run_dir)[-1].name == "step_00000004"
    manager.save(Progress(epoch=1, batches_done=1, step=5))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]
    assert manager.load(checkpoints / "step_00000004").epoch == 1


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif how == "edit":  # still valid JSON, another value: a step that never ran
        path.write_bytes(data.replace(b'"step": 4', b'"step": 5'))
        assert path.read_bytes() != data
    elif how == "flip":  # one byte in the middle of the data: only a checksum notices
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        path.unlink()


@pytest.mark.parametrize("name,how,reason", [
    ("progress.json", "cut", "progress.json is unreadable"),
    ("progress.json", "edit", "progress.json is damaged (it differs from the copy in manifest.json)"),
    ("manifest.json", "cut", "manifest.json is unreadable"),
    ("model.safetensors", "cut", "model.safetensors is damaged ("),
    ("model.safetensors", "empty", "model.safetensors is empty"),
    ("optimizer.safetensors", "flip", "optimizer.safetensors is damaged (its SHA-256 differs"),
    ("optimizer.json", "missing", "optimizer.json is missing"),
    ("scheduler.json", "cut", "scheduler.json is damaged ("),
    ("rng_0.safetensors", "flip", "rng_0.safetensors is damaged (its SHA-256 differs"),
    ("rng_0.json", "missing", "rng_0.json is missing"),
])
def test_resume_skips_a_damaged_newest_checkpoint_and_refuses_one_named(tmp_path: Path, caplog, name: str,
                                                                          how: str, reason: str) -> None:
    """A damaged file (a power loss, a full disk, a copy cut short) in the newest checkpoint: resuming the run folder
    falls back to the one before, with a warning; naming that checkpoint is refused with the reason (the load used to
    fail with a raw traceback, and a missing RNG file was ignored: the run went on, not exactly)."""
    from multimodal.engine import CheckpointError, resolve_checkpoint

    run_dir, _ = saved_run(tmp_path)
    newest = run_dir / "checkpoints" / "step_00000004"
    assert CheckpointManager.problem(newest) is None
    damage(newest / name, how)
    assert reason in CheckpointManager.problem(newest)
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(str(run_dir)) == run_dir / "checkpoints" / "step_00000002"
    assert f"skipped the damaged checkpoint(s) step_00000004 ({reason}" in caplog.text
    with pytest.raises(CheckpointError, match=rf"no usable checkpoint: step_00000004 \({re.escape(reason)}.*resume "
                                              rf"the run folder \({run_dir}\) to fall back"):
        resolve_checkpoint(str(newest))


def test_resume_needs_every_process_rng_state_and_refuses_when_nothing_is_usable(tmp_path: Path) -> None:
    from multimodal.engine import CheckpointError, resolve_checkpoint

    run_dir, _ = saved_run(tmp_path, steps=(2,), processes=2)  # a run of two processes, with one RNG file
    with pytest.raises(CheckpointError, match=r"no usable checkpoint: step_00000002 \(rng_1.json is missing"):
        resolve_checkpoint(str(run_dir))


def test_a_failed_save_removes_its_partial_checkpoint_and_says_the_earlier_ones_are_intact(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    from multimodal.engine import CheckpointError

    from multimodal import engine

    run_dir, manager = saved_run(tmp_path, steps=(2,))

    def disk_full(acc: Accelerator, folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "save_training_state", disk_full)
    with pytest.raises(CheckpointError, match=rf"could not write the checkpoint .*step_00000004 \(OSError: .*No "
                                              rf"space left on device\); the earlier ones are intact.*"
                                              rf"--resume {run_dir}"):
        manager.save(Progress(epoch=0, batches_done=4, step=4))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert CheckpointManager.problem(run_dir / "checkpoints" / "step_00000002") is None


def test_a_checkpoint_is_safetensors_and_json_and_restores_every_state_exactly(tmp_path: Path, monkeypatch) -> None:
    """No pickle is written or read: the optimizer (integer-keyed state, tuples among its settings), the scheduler,
    Accelerate's step and each generator (Python, NumPy, torch) come back exactly."""
    import json
    import random

    import numpy as np

    run_dir, manager = saved_run(tmp_path, steps=(2,))
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "progress.json",
        "rng_0.json", "rng_0.safetensors", "scheduler.json"]
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert sorted(manifest) == sorted(p.name for p in checkpoint.iterdir()
                                      if p.name not in ("manifest.json", "progress.json"))
    acc = manager.accelerator
    optimizer, scheduler = acc._optimizers[0], acc._schedulers[0]
    expected_optimizer, expected_scheduler = copy.deepcopy(optimizer.state_dict()), scheduler.state_dict()
    acc.step = 7
    manager.save(Progress(epoch=0, batches_done=3, step=3))
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    train_step(acc._models[0], optimizer, acc)  # everything moves on
    scheduler.step()
    acc.step = 0
    random.random(), np.random.rand(), torch.rand(1)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load (a pickle) was called")

    monkeypatch.setattr(torch, "load", no_pickles)
    assert manager.load(run_dir / "checkpoints" / "step_00000003").step == 3
    assert acc.step == 7
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    got = optimizer.state_dict()
    assert got["param_groups"] == expected_optimizer["param_groups"]  # betas a tuple again, and every setting
    assert got["state"].keys() == expected_optimizer["state"].keys()
    for index, state in expected_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(got["state"][index][name], value), (index, name)
    assert scheduler.state_dict() == expected_scheduler


def test_a_checkpoint_in_accelerates_own_format_still_resumes(tmp_path: Path) -> None:
    """Runs checkpointed before the switch to safetensors + JSON (accelerator.save_state: pickled optimizer, scheduler
    and generators, read by its restricted unpickler) resume, and their damage is found by the archives' checksums."""
    import json

    def unflattened(seed: int) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
        acc = Accelerator(cpu=True)
        model = make_model(seed)
        optimizer = build_optimizer(model, 1e-2, 1e-2, 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer, _ = acc.prepare(model, optimizer, scheduler)
        return acc, model, optimizer

    acc, model, optimizer = unflattened(seed=0)
    train_step(model, optimizer, acc)
    old = tmp_path / "run" / "checkpoints" / "step_00000001"
    acc.save_state(str(old))
    (old / "progress.json").write_text(json.dumps({"epoch": 0, "batches_done": 1, "step": 1}))
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert CheckpointManager.problem(old) is None

    acc2, model2, _ = unflattened(seed=1)
    assert CheckpointManager(acc2, tmp_path / "run").load(old).step == 1
    for name, value in model2.state_dict().items():
        assert torch.equal(value, expected[name]), name
    damage(old / "random_states_0.pkl", "flip")
    assert "random_states_0.pkl is damaged" in CheckpointManager.problem(old)


def test_the_log_keeps_what_a_resumed_run_will_not_log_again(tmp_path: Path) -> None:
    import json

    from multimodal.engine import JSONLinesTracker

    log = tmp_path / "log.jsonl"
    entries = [{"step": 3, "train/loss": 1.0}, {"step": 5, "train/loss": 0.9}, {"step": 5, "epoch": 0, "val": 0.5},
               {"step": 6, "train/loss": 0.8}]
    text = "".join(json.dumps(e) + "\n" for e in entries) + '{"step": 7, "tr'  # a torn last line
    tracker = JSONLinesTracker(log)
    log.write_text(text)
    assert tracker.truncate_after(5) == 2  # an epoch-end checkpoint at step 5: epoch 0's line stays
    assert [json.loads(line) for line in log.read_text().splitlines()] == entries[:3]
    log.write_text(text)
    # A checkpoint at epoch 0's last batch (step 5), a kill before the epoch's own: epoch 0 is validated again.
    assert tracker.truncate_after(5, open_epoch=0) == 3
    assert [json.loads(line) for line in log.read_text().splitlines()] == entries[:2]


def test_a_checkpoint_before_the_first_optimizer_step_resumes(tmp_path: Path) -> None:
    """Under fp16 the gradient scaler may skip the first steps: a checkpoint then holds an AdamW with no state, and
    so no optimizer.safetensors (it was refused as "missing")."""
    from multimodal.engine import resolve_checkpoint

    acc, model, optimizer = prepared(seed=0)
    acc.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    saved = CheckpointManager(acc, tmp_path).save(Progress(epoch=0, batches_done=2, step=2))
    assert not (saved / "optimizer.safetensors").exists() and CheckpointManager.problem(saved) is None
    assert resolve_checkpoint(str(tmp_path)) == saved
    assert CheckpointManager(acc, tmp_path).load(saved).step == 2


@pytest.mark.parametrize("skipped", [False, True])
def test_the_weight_average_leaves_out_an_optimizer_step_that_fp16_skipped(monkeypatch, skipped: bool) -> None:
    """Under fp16 the gradient scaler skips a step whose gradients overflowed (the weights stay where they were) and
    Accelerate's scheduler leaves its rate; the weight average (--ema-decay) must not move either. A skipped step is
    simulated here (a CPU has no gradient scaler): the average stays as built then, and moves when none is skipped."""
    acc, model, optimizer = prepared(0)
    scheduler = acc.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    ema = build_ema(acc.unwrap_model(model), 0.5)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: skipped))
    g = torch.Generator().manual_seed(3)
    batch = dict(caption_ids=torch.randint(2, VOCAB, (4, 5), generator=g), caption_lengths=torch.tensor([5, 3, 2, 4]),
                 targets=torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]]),
                 label_seq=torch.tensor([[0, 3, C], [1, C, -100], [2, C, -100], [0, 1, C]]), image_id=list("abcd"))
    progress = Progress()
    train_one_epoch(model, [batch, batch], JointLoss(LossConfig()), optimizer, scheduler, acc, progress,
                    total_batches=2, use_image=False, ema=ema)
    after = ema.module.state_dict()
    assert progress.step == 2
    assert any(not torch.equal(before[k], after[k]) for k in before) != skipped


def test_a_resumed_runs_training_time_counts_every_session_up_to_its_last_checkpoint(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """metrics.json's train_seconds used to cover the last session only. The clock runs from `start_clock`; each
    checkpoint records the time so far, which a resume continues from (a session's time after its last checkpoint is
    left out: that work is done again)."""
    from multimodal import engine
    now = [100.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])
    run_dir, manager = saved_run(tmp_path, steps=())
    progress = Progress(epoch=0, batches_done=2, step=2)
    assert progress.clock() == 0.0  # not started: nothing counted
    progress.start_clock()
    now[0] += 30.0
    saved = manager.save(progress)
    now[0] += 50.0  # lost with the session: after its last checkpoint
    resumed = manager.load(saved)
    assert resumed.train_seconds == 30.0 and resumed.step == 2
    resumed.start_clock()
    now[0] += 20.0
    assert resumed.clock() == 50.0


def test_an_epochs_last_shorter_gradient_accumulation_window_steps_with_its_batches_mean_gradient() -> None:
    """With --grad-accum 3 and 4 batches the epoch's last window holds 1 batch. Accelerate divides every loss by 3, so
    that window's step got a third of its batch's gradient; it gets the whole mean now, as a full window does. Four
    identical batches and a learning rate of 0 (the weights stay put): both steps see the same gradient."""
    from torch.utils.data import DataLoader
    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)
    torch.manual_seed(0)
    model = MultimodalClassifier(ModelConfig(num_labels=C, image_encoder=None, vocab_size=VOCAB, word_dim=8,
                                             caption_hidden=8, label_embed_dim=8, decoder_hidden=16, max_labels=3,
                                             use_decoder=True, dropout=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(3)
    batch = dict(caption_ids=torch.randint(2, VOCAB, (4, 5), generator=g), caption_lengths=torch.tensor([5, 3, 2, 4]),
                 targets=torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]]),
                 label_seq=torch.tensor([[0, 3, C], [1, C, -100], [2, C, -100], [0, 1, C]]), image_id=list("abcd"))
    loader = DataLoader(range(4), batch_size=1, collate_fn=lambda _: dict(batch))
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    scheduler = acc.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    grads = []
    optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(torch.cat(
        [p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    progress = Progress()
    train_one_epoch(model, loader, JointLoss(LossConfig()), optimizer, scheduler, acc, progress, total_batches=4,
                    max_grad_norm=0.0, use_image=False)
    assert progress.step == 2 and len(grads) == 2
    torch.testing.assert_close(grads[1], grads[0])
