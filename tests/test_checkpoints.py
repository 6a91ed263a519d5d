"""Checkpoints of a model whose LSTM weights are views of one flat buffer, as cuDNN keeps them on a GPU.

On a GPU `nn.LSTM.flatten_parameters` makes every weight of an LSTM a view of one buffer. Accelerate's safetensors
checkpoint used to keep one name per shared storage (losing all other LSTM weights: seen on an H200, `benchmarks/
results/gpu-recipe-h200.log`), and safetensors refused to load into such a model. These tests build that layout on
the CPU, where `flatten_parameters` does nothing, and check that every weight survives a save and a load.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from multimodal.config import LossConfig, ModelConfig
from multimodal.engine import CheckpointManager, Progress, build_optimizer
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
