"""train.py and predict.py end to end: each test runs the scripts as subprocesses into a temporary folder and checks
what they wrote (the run folder, the exported model, the CSVs) and what they said.

Everything is tiny (32-pixel demo images, a random EfficientNet-Lite0, one or two epochs of a few batches) so that the
whole file runs in a few minutes on 2 busy CPU cores; expensive runs are module fixtures shared by several tests.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from multimodal.annotations import read_annotations
from multimodal.data import Collator, ImageCaptionDataset, subsample_rows, train_val_split
from multimodal.demo import LABELS, make_demo_dataset
from multimodal.engine import CheckpointManager
from multimodal.labels import LabelCodec
from multimodal.metrics import compute_metrics
from multimodal.model import MultimodalClassifier
from multimodal.text import encode_captions

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
PREDICT = REPO / "predict.py"
# A small, quick model and run: random weights (no download), 32-pixel images, no worker processes.
TINY = ("--image-size", "32", "--no-pretrained", "--workers", "0", "--batch-size", "8",
        "--word-dim", "32", "--caption-hidden", "32")
# 48 labelled rows -> 38 training rows (5 batches of 8, the last one of 6) and 10 validation rows; 12 test rows.
NUM_TRAIN, NUM_TEST, NUM_VAL = 48, 12, 10
BRANCHES = ("image_encoder.", "caption_encoder.", "label_decoder.")
OUTPUTS = ("image", "caption", "fused", "decoder", "final")
CLASS_NAMES = [label.name for label in LABELS]
# Variables that would change how a script launches or behaves; the tests set what they need themselves.
_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
                "MV2_COMM_WORLD_RANK", "MULTIMODAL_KILL_AFTER_CHECKPOINT")


# ----------------------------------------------------------------------------------------------------------- helpers

def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("ACCELERATE_")}
    # 2 cores shared by everything: no spinning OpenMP threads, one thread per process; never reach the network.
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(script: Path, *args: Any, cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a script with this interpreter; with ``check`` a non-zero exit fails the test, showing the output."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc


def launch(*args: Any, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``accelerate launch ARGS`` (as a module, so no console script is needed)."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


def checkpoint_keys(model_dir: Path) -> list[str]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The script's one-line ``error: ...`` report; there must be no traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def copy_images(data_dir: Path, dst: Path) -> Path:
    shutil.copytree(data_dir / "data", dst)
    return dst


def break_image(image_dir: Path, image_id: str, how: str) -> None:
    if how == "missing":
        (image_dir / image_id).unlink()
    else:
        (image_dir / image_id).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")


def layout(run_dir: Path) -> set[str]:
    """The files of a run folder with numbers (steps, ranks, timestamps, pids) replaced by N."""
    return {re.sub(r"\d+", "N", p.relative_to(run_dir).as_posix()) for p in run_dir.rglob("*") if p.is_file()}


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data"), num_train=NUM_TRAIN, num_test=NUM_TEST, image_size=32)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python train.py`` with the default data (the demo, generated into ./data/demo) and the default run folder
    (./runs/<timestamp>, ./runs/latest), the full model, tuned thresholds and charts."""
    cwd = tmp_path_factory.mktemp("cwd")
    proc = run(TRAIN, "--limit", NUM_TRAIN, "--epochs", 1, "--tune-thresholds", "--log-every", 2, *TINY, cwd=cwd)
    return cwd, proc


@pytest.fixture(scope="module")
def run_dir(default_run: tuple[Path, subprocess.CompletedProcess]) -> Path:
    cwd, _ = default_run
    return cwd / "runs" / os.readlink(cwd / "runs" / "latest")


@pytest.fixture(scope="module")
def caption_only(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("caption_only") / "run"
    run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 1, "--no-plots", *TINY,
        "--output-dir", out)
    return out / "model"


@pytest.fixture(scope="module")
def image_only_bf16(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image-only ablation, trained under bf16 autocast (on CPU) from the uint8 image cache, with the full-image
    crop mode: also the mixed-precision and image-cache smoke run. The precision is the launcher's
    (`accelerate launch --mixed_precision bf16`), which train.py's own default once overrode: the run was float32."""
    out = tmp_path_factory.mktemp("image_only") / "run"
    proc = launch("--num_processes", 1, "--num_machines", 1, "--mixed_precision", "bf16", "--dynamo_backend", "no",
                  TRAIN, "--data-dir", data_dir, "--no-caption", "--max-steps", 3,
                  "--no-plots", "--image-cache", out.parent / "image_cache", "--image-crop", "full", *TINY,
                  "--output-dir", out, cwd=out.parent, env=script_env(ACCELERATE_USE_CPU="true"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "image cache" in proc.stderr and "built in" in proc.stderr
    return out


RESUMABLE = ("--epochs", 2, "--checkpoint-every", 3, "--keep-checkpoints", 2, "--no-plots")


@pytest.fixture(scope="module")
def reference_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 1-process run: 2 epochs of 5 steps, checkpoints at steps 3, 5 (epoch), 6, 9, 10 (epoch)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(TRAIN, "--data-dir", data_dir, *RESUMABLE, *TINY, "--output-dir", out)
    return out


# ------------------------------------------------------------------------------------------------------------ train

def test_help_lists_every_flag_grouped_with_defaults() -> None:
    text = run(TRAIN, "--help").stdout
    for group in ("data:", "model:", "optimisation:", "run:"):
        assert f"\n{group}\n" in text
    for flag in ("--encoder", "--pretrained", "--no-pretrained", "--pretrained-file", "--image-size", "--epochs",
                 "--max-steps", "--batch-size", "--lr", "--backbone-lr", "--weight-decay", "--workers",
                 "--val-fraction", "--seed", "--mixed-precision {no,fp16,bf16}", "--grad-accum", "--output-dir",
                 "--checkpoint-every", "--resume", "--no-image", "--no-caption", "--no-decoder",
                 "--freeze-image-encoder", "--tune-thresholds", "--skip-bad-images", "--data-dir", "--demo-dir"):
        assert re.search(rf"^\s+{re.escape(flag)}(?=[\s,]|$)", text, re.MULTILINE), flag
    flat = " ".join(text.split())  # help lines are wrapped
    assert "(default: 32)" in flat and "(default: tf_efficientnet_lite0)" in flat and "else no)" in flat
    # every option but --help states its default
    assert flat.count("(default: ") == len(re.findall(r"^  -", text.split("\ndata:\n")[1], re.MULTILINE))
    assert "\n    python train.py --data-dir ../shared/comp5329" in text  # the usage examples keep their lines
    text = run(PREDICT, "--help").stdout
    assert "\n    python predict.py --checkpoint runs/latest/model --image-dir photos/" in text
    for flag in ("--checkpoint", "--data-dir", "--csv", "--image-dir", "--output", "--probabilities", "--threshold",
                 "--batch-size", "--workers", "--mixed-precision {no,fp16,bf16}", "--skip-bad-images"):
        assert re.search(rf"^\s+{re.escape(flag)}(?=[\s,]|$)", text, re.MULTILINE), flag


def test_conflicting_loss_and_compile_flags_are_refused_before_anything_loads(tmp_path: Path) -> None:
    for flags, words in ((("--asl-gamma-neg", 4, "--focal-gamma", 1), ("--asl-gamma-neg", "--focal-gamma")),
                         (("--compile", "--no-image"), ("--compile", "--no-image")),
                         (("--ema-decay", -0.1), ("--ema-decay must be in [0, 1)",)),
                         (("--decoder-weight", 0.2), ("--decoder-weight", "--combine fused_decoder")),
                         (("--combine", "fused_decoder", "--decoder-weight", 0.2, "--no-decoder"),
                          ("--decoder-weight", "the decoder on")),
                         (("--combine", "fused_decoder", "--decoder-weight", 1.5), ("--decoder-weight must be in [0, 1]",))):
        proc = run(TRAIN, *flags, check=False, cwd=tmp_path)
        assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr
    assert not list(tmp_path.iterdir())  # no run folder, no demo data


def test_default_run_trains_on_demo_data_and_exports(default_run: tuple[Path, subprocess.CompletedProcess],
                                                     run_dir: Path) -> None:
    cwd, proc = default_run
    assert (cwd / "data" / "demo" / "train.csv").is_file()  # the demo data, generated on first use
    latest = cwd / "runs" / "latest"
    assert latest.is_symlink() and re.fullmatch(r"\d{8}-\d{6}(-\d+)?", os.readlink(latest))
    assert sorted(p.name for p in (run_dir / "model").iterdir()) == ["config.json", "model.safetensors",
                                                                       "tokenizer.json"]
    model = MultimodalClassifier.from_pretrained(run_dir / "model")  # loads: complete and consistent
    assert model.image_encoder is not None and model.caption_encoder is not None and model.label_decoder is not None

    saved = json.loads((run_dir / "run_config.json").read_text())
    args = saved["args"]
    assert args["data_dir"] is None and args["limit"] == NUM_TRAIN and args["epochs"] == 1
    assert args["image_size"] == 32 and args["pretrained"] is False and args["tune_thresholds"] is True
    assert args["backbone_lr"] == args["lr"]  # resolved: no pretrained weights, one rate
    assert saved["num_processes"] == 1 and saved["train_rows"] + saved["val_rows"] == NUM_TRAIN
    assert saved["model"]["image_size"] == 32 and saved["model"]["num_labels"] == len(LABELS)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    said = re.search(r"validation samples-F1 ([0-9.]+) \(trivial baseline: .*?([0-9.]+)\)", proc.stderr)
    assert said, proc.stderr[-3000:]
    assert float(said[1]) == pytest.approx(metrics["val"]["final"]["samples_f1"], abs=1e-4)
    assert float(said[2]) == pytest.approx(metrics["trivial_samples_f1"], abs=1e-4)
    assert metrics["num_val_samples"] == saved["val_rows"]


def test_log_has_every_epoch_metric_per_output_and_class(run_dir: Path) -> None:
    records = read_log(run_dir)
    epochs = [r for r in records if "epoch" in r]
    assert len(epochs) == 1
    epoch = epochs[0]
    for term in ("loss", "image_loss", "caption_loss", "fused_loss", "decoder_loss"):
        assert np.isfinite(epoch[f"train_epoch/{term}"])
    absent = ~np.load(run_dir / "val_predictions.npz")["targets"].astype(bool).any(0)  # no positive in validation
    for out in OUTPUTS:
        for metric in ("samples_f1", "micro_f1", "macro_f1", "map"):
            assert f"val/{out}/{metric}" in epoch, (out, metric)
        for c, name in enumerate(CLASS_NAMES):  # no F1 (NaN) only for a class neither present nor predicted
            f1 = epoch[f"val/{out}/per_class_f1/{name}"]
            assert 0.0 <= f1 <= 1.0 or np.isnan(f1) and absent[c], (out, name, f1)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]  # --log-every 2
    for png in ("training_curves.png", "per_class_f1.png"):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_tuned_thresholds_are_stored_only_when_they_beat_one_half_held_out(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val_tuned" in metrics and "val_tuned_crossfit" in metrics and "val_single_threshold_crossfit" in metrics
    held_out = {"0.5": metrics["val"]["final"]["samples_f1"],
                "single": metrics["val_single_threshold_crossfit"]["samples_f1"],
                "per_class": metrics["val_tuned_crossfit"]["samples_f1"]}
    best = max(held_out.values())
    assert held_out[metrics["threshold_mode"]] == best
    assert metrics["threshold_mode"] == next(m for m in ("0.5", "single", "per_class") if held_out[m] == best)
    kept = metrics["threshold_mode"] != "0.5"
    assert metrics["thresholds_stored"] is kept
    thresholds = json.loads((run_dir / "model" / "config.json").read_text())["thresholds"]
    if kept:
        assert isinstance(thresholds, list) and len(thresholds) == len(LABELS)
        assert all(0.0 < t < 1.0 for t in thresholds)
        if metrics["threshold_mode"] == "single":
            assert thresholds == [metrics["val_single_threshold"]] * len(LABELS)
    else:
        assert thresholds is None


def test_word_vectors_initialise_the_caption_embeddings(data_dir: Path, tmp_path: Path) -> None:
    # Vectors for every word of the demo captions, in the folder layout, 6-dimensional: --word-dim follows them.
    words = sorted({w for c in pd.read_csv(data_dir / "train.csv", on_bad_lines="skip")["Caption"]
                    for w in re.findall(r"[a-z]+", str(c).lower())})
    vectors = np.random.default_rng(0).normal(size=(len(words), 6)).astype(np.float32)
    folder = tmp_path / "vectors"
    folder.mkdir()
    np.save(folder / "vectors.npy", vectors)
    (folder / "words.txt").write_text("\n".join(words) + "\n")
    at = TINY.index("--word-dim")
    tiny = TINY[:at] + TINY[at + 2:]
    wrong = run(TRAIN, "--data-dir", data_dir, *TINY, "--glove", folder, "--output-dir", tmp_path / "no", check=False)
    assert wrong.returncode == 2 and "6-dimensional vectors but --word-dim is 32" in wrong.stderr
    out = tmp_path / "run"
    # A learning rate of 0 leaves the embeddings as initialised (AdamW's decay is scaled by the rate too).
    proc = run(TRAIN, "--data-dir", data_dir, *tiny, "--no-image", "--no-decoder", "--epochs", 1, "--lr", 0,
               "--no-plots", "--glove", folder, "--output-dir", out)
    assert json.loads((out / "model" / "config.json").read_text())["model"]["word_dim"] == 6
    vocab = json.loads((out / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    found = [w for w in words if w in vocab]
    assert f"word vectors: {len(found)} of {len(vocab)} words initialised" in proc.stderr and len(found) > 5
    embedding = load_file(str(out / "model" / "model.safetensors"))["caption_encoder.embedding.weight"]
    rows = {w: i for i, w in enumerate(words)}
    for word in found:
        torch.testing.assert_close(embedding[vocab[word]], torch.from_numpy(vectors[rows[word]]), msg=word)


@pytest.mark.parametrize("which", ["full", "caption_only", "image_only"])
def test_ablated_branches_have_no_weights_in_the_export(which: str, run_dir: Path, caption_only: Path,
                                                        image_only_bf16: Path) -> None:
    model_dir, absent = {"full": (run_dir / "model", ()),
                         "caption_only": (caption_only, ("image_encoder.", "label_decoder.")),
                         "image_only": (image_only_bf16 / "model", ("caption_encoder.",))}[which]
    keys = checkpoint_keys(model_dir)
    for prefix in BRANCHES:
        found = any(k.startswith(prefix) for k in keys)
        assert found == (prefix not in absent), (which, prefix)
    if "image_encoder." in absent:
        assert not any(k.startswith("image_head.") for k in keys)
    if "caption_encoder." in absent:
        assert not any(k.startswith("caption_head.") for k in keys)
        assert not (model_dir / "tokenizer.json").exists()
    MultimodalClassifier.from_pretrained(model_dir)  # and it loads


def test_bf16_training_runs_on_cpu(image_only_bf16: Path) -> None:
    assert json.loads((image_only_bf16 / "run_config.json").read_text())["args"]["mixed_precision"] == "bf16"
    assert json.loads((image_only_bf16 / "model" / "config.json").read_text())["model"]["image_crop"] == "full"
    cache = list((image_only_bf16.parent / "image_cache").glob("images-*-squash-*.npy"))
    assert len(cache) == 1 and np.load(cache[0], mmap_mode="r").shape[0] == NUM_TRAIN  # the training CSV's images
    metrics = json.loads((image_only_bf16 / "metrics.json").read_text())
    assert metrics["steps"] == 3 and np.isfinite(metrics["val"]["final"]["samples_f1"])
    # --max-steps stopped it in mid-epoch (3 of 5 batches): checkpointed there, so that it can be resumed (it said
    # "no complete checkpoint yet")
    latest = CheckpointManager.latest(image_only_bf16)
    assert latest is not None and latest.name == "step_00000003" and CheckpointManager.problem(latest) is None
    weights = load_file(str(image_only_bf16 / "model" / "model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


@pytest.mark.slow
def test_killed_run_resumes_to_bit_identical_weights(data_dir: Path, reference_run: Path, tmp_path: Path) -> None:
    args = ("--data-dir", data_dir, *RESUMABLE, *TINY)  # default run folder: ./runs/<timestamp>
    killed = run(TRAIN, *args, cwd=tmp_path, env=script_env(MULTIMODAL_KILL_AFTER_CHECKPOINT="6"), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / os.readlink(tmp_path / "runs" / "latest")
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()  # it did stop early
    # Complete checkpoints only: the epoch-0 one (step 5) and step 6; step 3 pruned; no temporary folder left.
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000005", "step_00000006"]
    for checkpoint in checkpoints.iterdir():
        names = {p.name for p in checkpoint.iterdir()}
        assert names == {"progress.json", "manifest.json", "model.safetensors", "optimizer.safetensors",
                         "optimizer.json", "scheduler.json", "rng_0.safetensors", "rng_0.json"}  # no pickle
    progress = json.loads((checkpoints / "step_00000006" / "progress.json").read_text())
    assert {k: progress[k] for k in ("epoch", "batches_done", "step")} == {
        "epoch": 1, "batches_done": 1, "step": 6}  # mid-epoch: resuming must skip one batch of epoch 1
    assert progress["loss_batches"] == 1 and "loss" in progress["loss_sums"]

    # What a run that died between checkpoints leaves in its log: lines after the checkpoint, and a torn last line.
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 8, "train/loss": 123.0}) + "\n" + '{"step": 9, "train/lo')
    resumed = run(TRAIN, "--resume", "latest", "--workers", 0, cwd=tmp_path)
    assert "resumed from" in resumed.stderr and "epoch 1, batch 1, step 6" in resumed.stderr
    assert "dropped 2 line(s) logged after step 6" in resumed.stderr
    assert re.search(r"image encoder \S+: weights from the checkpoint \S+step_00000006", resumed.stderr)
    log = read_log(run_dir)  # every line parses, the stale ones are gone, each epoch's validation logged once
    assert not any(line.get("train/loss") == 123.0 for line in log)
    assert [line["epoch"] for line in log if "epoch" in line] == [0, 1]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 10
    assert not list(checkpoints.glob(".tmp-*"))

    assert_same_weights(reference_run, run_dir)
    assert epoch_losses(run_dir) == epoch_losses(reference_run)  # epoch 1's mean includes its batch before the kill


def epoch_losses(run_dir: Path) -> list[dict[str, float]]:
    """Each epoch's logged mean loss terms."""
    return [{k: v for k, v in line.items() if k.startswith("train_epoch/")} for line in read_log(run_dir)
            if "epoch" in line]


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_at_an_epochs_last_batch_resumes_with_its_epoch_loss(
        data_dir: Path, reference_run: Path, tmp_path: Path) -> None:
    """With --checkpoint-every 5, step 5 is saved twice: after the epoch's last batch, then at the epoch's end. A kill
    between the two resumes into an epoch with no batch left; its loss is still the epoch's mean (it was NaN)."""
    args = ("--data-dir", data_dir, *RESUMABLE, *TINY, "--checkpoint-every", 5, "--output-dir", tmp_path / "run")
    killed = run(TRAIN, *args, check=False, env=script_env(MULTIMODAL_KILL_AFTER_CHECKPOINT="5"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run(TRAIN, "--resume", tmp_path / "run", "--workers", 0)
    assert "epoch 0, batch 5, step 5" in resumed.stderr and "loss nan" not in resumed.stderr
    assert_same_weights(reference_run, tmp_path / "run")
    assert epoch_losses(tmp_path / "run") == epoch_losses(reference_run)


def assert_same_weights(expected_run: Path, actual_run: Path) -> None:
    """The two runs' exported weights are equal, tensor for tensor."""
    expected = load_file(str(expected_run / "model" / "model.safetensors"))
    actual = load_file(str(actual_run / "model" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    differ = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:5]}"


def assert_killed_and_resumed_run_matches(args: tuple[Any, ...], tmp_path: Path) -> subprocess.CompletedProcess:
    """Train with ``args`` uninterrupted and killed after the checkpoint of step 6 then resumed; the two exports
    must be equal tensor for tensor. Returns the uninterrupted run's process."""
    reference = run(TRAIN, *args, "--output-dir", tmp_path / "reference")
    killed = run(TRAIN, *args, "--output-dir", tmp_path / "killed", check=False,
                 env=script_env(MULTIMODAL_KILL_AFTER_CHECKPOINT="6"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run(TRAIN, "--resume", tmp_path / "killed", "--workers", 0, cwd=tmp_path)
    assert_same_weights(tmp_path / "reference", tmp_path / "killed")
    return reference


@pytest.mark.slow
def test_a_run_on_cached_maps_resumes_from_its_checkpoint_without_its_pretrained_file(data_dir: Path,
                                                                                     tmp_path: Path) -> None:
    """A resumed --cache-features run takes the encoder below its tail from its checkpoint, and finds the maps its
    start cached: its pretrained file may be gone or changed by then (it resolved the pretrained weights again, so a
    changed file keyed other maps, computed from other weights than the checkpoint's, and a missing one stopped it)."""
    import timm
    from safetensors.torch import save_file
    weights = tmp_path / "imagenet.safetensors"
    torch.manual_seed(3)
    save_file(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict(), str(weights))
    args = ("--data-dir", data_dir, *RESUMABLE, *TINY, "--cache-features", tmp_path / "maps", "--train-tail-stages", 1,
            "--pretrained-file", weights)
    run(TRAIN, *args, "--output-dir", tmp_path / "reference")
    killed = run(TRAIN, *args, "--output-dir", tmp_path / "killed", check=False,
                 env=script_env(MULTIMODAL_KILL_AFTER_CHECKPOINT="6"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    torch.manual_seed(4)
    save_file(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict(), str(weights))  # changed
    resumed = run(TRAIN, "--resume", tmp_path / "killed", "--workers", 0)
    assert "image features: cache hit" in resumed.stderr and len(list((tmp_path / "maps").iterdir())) == 1
    assert_same_weights(tmp_path / "reference", tmp_path / "killed")
    weights.unlink()  # gone: a finished run resumed (it re-exports) needs only its checkpoint
    run(TRAIN, "--resume", tmp_path / "killed", "--workers", 0)


@pytest.mark.slow
def test_weight_average_is_validated_exported_and_resumed(data_dir: Path, tmp_path: Path) -> None:
    """``--ema-decay``: the moving average of the weights is what is validated and exported, the last weights' own
    validation is logged beside it, and it is checkpointed (safetensors), so a killed and resumed run exports the
    average of an uninterrupted one."""
    reference = assert_killed_and_resumed_run_matches(("--data-dir", data_dir, *RESUMABLE, *TINY, "--ema-decay", 0.9),
                                                      tmp_path)
    assert "weight average: decay warming up to 0.9" in reference.stderr
    assert re.search(r"epoch 1: .*\(without the average: final \d\.\d{4}\)", reference.stderr)
    run_dir = tmp_path / "reference"
    last = CheckpointManager.latest(run_dir)
    assert last.name == "step_00000010"  # the end of training: its weights and average are those exported
    exported = load_file(str(run_dir / "model" / "model.safetensors"))
    average = load_file(str(last / "ema.safetensors"))
    weights = load_file(str(last / "model.safetensors"))
    assert exported.keys() == average.keys()
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    trained = [k for k in weights if exported[k].is_floating_point() and not torch.equal(exported[k], weights[k])]
    assert len(trained) > len(weights) // 2  # the average is not the last weights
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for out in OUTPUTS:
        assert 0 <= metrics["val"][out]["samples_f1"] <= 1 and 0 <= metrics["val_without_ema"][out]["samples_f1"] <= 1
    epochs = [line for line in read_log(run_dir) if "epoch" in line]
    assert [line["epoch"] for line in epochs] == [0, 1]
    assert all("val_without_ema/final/samples_f1" in line and "val/final/samples_f1" in line for line in epochs)
    refused = run(TRAIN, "--data-dir", data_dir, "--ema-decay", 1, check=False)
    assert refused.returncode == 2 and "--ema-decay must be in [0, 1)" in refused.stderr


@pytest.mark.slow
def test_compiled_image_encoder_trains_exports_the_same_weights_and_predicts_as_eager(data_dir: Path,
                                                                                      reference_run: Path,
                                                                                      tmp_path: Path) -> None:
    """``--compile`` (train.py and predict.py) compiles the image encoder in place: the run trains and validates,
    its export has the weights of an eager run under the same names, and compiled prediction matches eager
    prediction of the same model to float rounding."""
    out = tmp_path / "run"
    proc = run(TRAIN, "--data-dir", data_dir, "--max-steps", 2, "--no-plots", "--compile", *TINY, "--output-dir", out)
    assert "image encoder: compiled with torch.compile" in proc.stderr
    assert checkpoint_keys(out / "model") == checkpoint_keys(reference_run / "model")
    assert 0 <= json.loads((out / "metrics.json").read_text())["val"]["final"]["samples_f1"] <= 1
    probs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        probs[name] = tmp_path / f"{name}.csv"
        run(PREDICT, "--checkpoint", out / "model", "--data-dir", data_dir, "--output", tmp_path / f"{name}_l.csv",
            "--probabilities", probs[name], "--workers", 0, *extra)
    np.testing.assert_allclose(pd.read_csv(probs["compiled"]).iloc[:, 1:].to_numpy(),
                               pd.read_csv(probs["eager"]).iloc[:, 1:].to_numpy(), atol=1e-4)
    refused = run(TRAIN, "--data-dir", data_dir, "--compile", "--cache-features", tmp_path / "c", check=False)
    assert refused.returncode == 2 and "--compile" in refused.stderr and "--cache-features" in refused.stderr


@pytest.mark.slow
def test_device_augmentation_from_the_image_cache_resumes_to_bit_identical_weights(data_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """``--device-augment``: the loader hands over the cached uint8 images and the training step augments them
    batched (here on the CPU), drawing from a generator seeded per batch, so a killed and resumed run still ends with
    the weights of an uninterrupted one."""
    reference = assert_killed_and_resumed_run_matches(
        ("--data-dir", data_dir, *RESUMABLE, *TINY, "--no-caption", "--image-cache", tmp_path / "cache",
         "--device-augment"), tmp_path)
    assert "training augmentation: batched on cpu" in reference.stderr
    # Without the cache there is nothing to augment on the device: refused before anything is loaded.
    refused = run(TRAIN, "--data-dir", data_dir, "--device-augment", check=False)
    assert refused.returncode == 2 and "--device-augment" in refused.stderr and "--image-cache" in refused.stderr


@pytest.mark.slow
def test_decode_on_device_resumes_to_bit_identical_weights_and_predicts_as_the_pil_path(
        data_dir: Path, run_dir: Path, tmp_path: Path) -> None:
    """``--decode-on-device``: the loader workers only read the files, and the training step decodes, resizes and
    augments the batch where the model runs (here the CPU). A killed and resumed run ends with the weights of an
    uninterrupted one, and predict.py's decoded-on-device probabilities are those of its Pillow path up to
    resampling rounding."""
    reference = assert_killed_and_resumed_run_matches(
        ("--data-dir", data_dir, *RESUMABLE, *TINY, "--no-caption", "--decode-on-device"), tmp_path)
    assert "images: decoded batched on cpu" in reference.stderr
    assert "training augmentation" not in reference.stderr  # no image cache is built
    metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics["num_val_samples"] == NUM_VAL and 0 < metrics["val"]["final"]["samples_f1"] <= 1

    probs = {}
    for name, extra in (("pil", ()), ("device", ("--decode-on-device",))):
        probs[name] = tmp_path / f"{name}.csv"
        run(PREDICT, "--checkpoint", run_dir / "model", "--data-dir", data_dir, "--output", tmp_path / f"{name}_l.csv",
            "--probabilities", probs[name], "--batch-size", 5, "--workers", 0, *extra)
    pil, device = (pd.read_csv(probs[k]) for k in ("pil", "device"))
    assert list(pil["ImageID"]) == list(device["ImageID"])
    difference = np.abs(pil.iloc[:, 1:].to_numpy() - device.iloc[:, 1:].to_numpy())
    assert difference.mean() < 0.01 and difference.max() < 0.1, (difference.mean(), difference.max())
    refused = run(TRAIN, "--data-dir", data_dir, "--decode-on-device", "--image-cache", tmp_path / "c", check=False)
    assert refused.returncode == 2 and "--decode-on-device" in refused.stderr


@pytest.mark.slow
def test_cpu_data_parallel_two_processes(data_dir: Path, reference_run: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = cwd / "ddp"
    proc = launch("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", free_port(),
                  TRAIN, "--data-dir", data_dir, *RESUMABLE, *TINY, "--output-dir", out,
                  cwd=cwd, env=script_env(ACCELERATE_USE_CPU="true", HF_HOME=str(tmp_path / "hf")))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((out / "run_config.json").read_text())["num_processes"] == 2
    metrics = json.loads((out / "metrics.json").read_text())

    # Data parallel: the same parameters on both ranks after training ...
    checksums = metrics["param_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    # ... each rank trained on its own samples: per epoch, 2 full rounds of 2 x 8 rows (the 6 left over dropped).
    order = metrics["data_order_per_rank"]
    assert len(order) == 2 and all(len(epochs) == 2 for epochs in order)
    for epoch in range(2):
        rank0, rank1 = order[0][epoch], order[1][epoch]
        assert len(rank0) == len(rank1) == 16 and len(set(rank0)) == len(set(rank1)) == 16
        assert not set(rank0) & set(rank1), epoch
    assert metrics["steps"] == 4
    # ... every validation row counted exactly once.
    assert metrics["num_val_samples"] == NUM_VAL and sorted(metrics["val_index"]) == list(range(NUM_VAL))

    # Only the main process wrote: the run folder holds what a 1-process run writes, plus each rank's RNG state in
    # the checkpoints; the log holds each record once; the summary was printed once.
    assert layout(out) == layout(reference_run)
    for checkpoint in (out / "checkpoints").iterdir():
        assert {"rng_0.json", "rng_1.json"} <= {p.name for p in checkpoint.iterdir()}
    assert sorted(p.name for p in cwd.iterdir()) == ["ddp"]
    records = read_log(out)
    assert sum("config" in r for r in records) == 1 and [r["epoch"] for r in records if "epoch" in r] == [0, 1]
    assert proc.stderr.count("validation samples-F1") == 1 and proc.stderr.count("exported") == 1
    assert proc.stderr.count(f"images: all {NUM_TRAIN} decode") == 1 and "a share on each of 2 processes" in proc.stderr


def test_cpu_data_parallel_processes_check_a_share_of_the_images_each_and_stop_together(data_dir: Path,
                                                                                        tmp_path: Path) -> None:
    images = copy_images(data_dir, tmp_path / "images")
    break_image(images, "3.jpg", "corrupt")  # the rows are dealt out in turn: data rows 4 and 41 go to different
    break_image(images, "40.jpg", "corrupt")  # processes, and each process names both
    proc = launch("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", free_port(),
                  TRAIN, "--data-dir", data_dir, "--image-dir", images, *TINY, "--epochs", 1, "--no-plots",
                  "--output-dir", tmp_path / "ddp", cwd=tmp_path,
                  env=script_env(ACCELERATE_USE_CPU="true", HF_HOME=str(tmp_path / "hf")), timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # (the launcher may stop the other process before it prints: whichever speaks names both images)
    assert lines and len(set(lines)) == 1, proc.stderr[-3000:]
    assert re.search(r"2 image\(s\) cannot be decoded: data row 4 \(ImageID '3.jpg'\): .*; data row 41 "
                     r"\(ImageID '40.jpg'\)", lines[0])
    assert not (tmp_path / "ddp").exists()  # stopped before the run folder was made


@pytest.mark.slow
def test_cpu_data_parallel_weight_average_is_checkpointed_and_restored_on_every_process(data_dir: Path,
                                                                                        tmp_path: Path) -> None:
    """The average is written once (by the main process) and read back by every process: a finished 2-process run
    resumed from its last checkpoint exports the same average again."""
    out = tmp_path / "ddp"
    common = ("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
              "--dynamo_backend", "no")
    env = script_env(ACCELERATE_USE_CPU="true", HF_HOME=str(tmp_path / "hf"))
    proc = launch(*common, "--main_process_port", free_port(), TRAIN, "--data-dir", data_dir, "--epochs", 1,
                  "--no-plots", "--ema-decay", 0.9, *TINY, "--output-dir", out, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    first = load_file(str(out / "model" / "model.safetensors"))
    last = CheckpointManager.latest(out)
    assert (last / "ema.safetensors").is_file() and not list(last.glob("ema*_1*"))  # one file, from the main process
    resumed = launch(*common, "--main_process_port", free_port(), TRAIN, "--resume", out, "--workers", 0,
                     cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from" in resumed.stderr
    again = load_file(str(out / "model" / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="reproduces a launch on a machine without GPUs")
def test_multi_gpu_launch_without_gpus_stops_instead_of_training_copies(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = launch("--multi_gpu", "--num_processes", 2, "--main_process_port", free_port(),
                  TRAIN, "--data-dir", data_dir, *TINY, "--epochs", 1, "--output-dir", out,
                  cwd=tmp_path, env=script_env(HF_HOME=str(tmp_path / "hf")), timeout=300)
    assert proc.returncode != 0
    assert "each process would train its own copy" in proc.stderr and "ACCELERATE_USE_CPU=true" in proc.stderr
    assert "WORLD_SIZE=2" in proc.stderr
    assert not out.exists()  # stopped before writing anything


def test_non_finite_loss_stops_with_the_step(data_dir: Path, tmp_path: Path) -> None:
    # One step at an absurd rate sends the weights to ~1e30: the next forward pass overflows.
    proc = run(TRAIN, "--data-dir", data_dir, *TINY, "--lr", "1e30", "--epochs", 1, "--no-plots",
               "--output-dir", tmp_path / "run", check=False)
    line = error_line(proc)
    assert "non-finite loss at step 2 " in line and "epoch 0, batch 1" in line
    assert not (tmp_path / "run" / "model").exists()


def test_train_stops_on_a_missing_image_naming_it(data_dir: Path, tmp_path: Path) -> None:
    # (A corrupt image stops a run from inside the data loader: see the predict test, which also uses workers.)
    images = copy_images(data_dir, tmp_path / "images")
    break_image(images, "3.jpg", "missing")
    (tmp_path / "runs" / "good").mkdir(parents=True)  # the last run that trained, which runs/latest names
    (tmp_path / "runs" / "latest").symlink_to("good")
    proc = run(TRAIN, "--data-dir", data_dir, "--image-dir", images, *TINY, "--epochs", 1, "--no-plots",
               cwd=tmp_path, check=False)  # into a default run folder
    line = error_line(proc)
    assert str(images / "3.jpg") in line and "missing" in line
    # runs/latest still names the last run that trained, for predict.py's default and --resume latest.
    assert os.readlink(tmp_path / "runs" / "latest") == "good"
    assert not list((tmp_path / "runs").glob("*/model"))


def test_train_decodes_every_image_first_and_lists_the_corrupt_ones(data_dir: Path, tmp_path: Path) -> None:
    images = copy_images(data_dir, tmp_path / "images")
    break_image(images, "3.jpg", "corrupt")
    (images / "40.jpg").write_bytes((images / "40.jpg").read_bytes()[:200])  # truncated
    out = tmp_path / "run"
    proc = run(TRAIN, "--data-dir", data_dir, "--image-dir", images, *TINY, "--epochs", 1, "--no-plots",
               "--output-dir", out, check=False)
    line = error_line(proc)  # both, in the annotation file's order, whichever split they are in
    assert re.search(r"2 image\(s\) cannot be decoded: data row 4 \(ImageID '3.jpg'\): .*; data row 41 "
                     r"\(ImageID '40.jpg'\): ", line) and "--skip-bad-images" in line, line
    assert not out.exists()  # stopped before the run folder was made

    # Only the rows a run reads are checked: here an image outside the quarter of the training rows it trains on.
    frame = read_annotations(data_dir / "train.csv").assign(_row=lambda f: range(len(f)))
    train, val = train_val_split(frame, 0.2, seed=0)
    used = set(subsample_rows(train, 0.25, seed=0)["ImageID"]) | set(val["ImageID"])
    images = copy_images(data_dir, tmp_path / "images2")
    break_image(images, next(i for i in frame["ImageID"] if i not in used), "corrupt")
    proc = run(TRAIN, "--data-dir", data_dir, "--image-dir", images, *TINY, "--epochs", 1, "--no-plots",
               "--train-fraction", 0.25, "--output-dir", out)
    assert f"images: all {len(used)} decode" in proc.stderr


def test_a_run_stopped_by_a_corrupt_image_says_how_to_resume_without_it(data_dir: Path, tmp_path: Path) -> None:
    # Without the check up front, a validation image found corrupt after the first epoch's steps stops the run.
    _, val = train_val_split(read_annotations(data_dir / "train.csv"), 0.2, seed=0)
    image_id = val["ImageID"].iloc[3]
    images = copy_images(data_dir, tmp_path / "images")
    break_image(images, image_id, "corrupt")
    out = tmp_path / "run"
    proc = run(TRAIN, "--data-dir", data_dir, "--image-dir", images, *TINY, "--workers", 1, "--epochs", 1,
               "--checkpoint-every", 2, "--no-verify-images", "--no-plots", "--output-dir", out, check=False)
    line = error_line(proc)  # read in a loader worker, reported as one line
    assert str(images / image_id) in line and "cannot decode" in line
    assert (f"`python train.py --resume {out} --skip-bad-images` continues from the last one without it"
            in proc.stderr)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert not (out / "model").exists()
    resumed = run(TRAIN, "--resume", out, "--skip-bad-images", "--workers", 0)
    assert "resumed from" in resumed.stderr and (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["bad_images"] == [image_id]
    saved = json.loads((out / "run_config.json").read_text())["args"]
    assert saved["skip_bad_images"] is True and saved["verify_images"] is False  # the run's own, kept
    again = run(TRAIN, "--resume", out, "--workers", 0)  # a run that skipped keeps skipping
    assert json.loads((out / "metrics.json").read_text())["bad_images"] == [image_id], again.stderr[-2000:]


@pytest.mark.parametrize("stop, status, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_says_how_to_resume_and_the_run_resumes(data_dir: Path, tmp_path: Path, stop: int, status: int,
                                                       said: str) -> None:
    """Ctrl-C, or SIGTERM (a scheduler's stop), ends the run with a line on how to resume it, and it resumes."""
    out = tmp_path / "run"
    args = ("--data-dir", data_dir, "--no-image", "--epochs", 30, "--max-steps", 60, "--checkpoint-every", 2,
            "--no-plots", *TINY, "--output-dir", out)
    proc = subprocess.Popen([sys.executable, str(TRAIN), *map(str, args)],
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Python turns SIGINT into KeyboardInterrupt only where it is not ignored, and a job
                            # started in the background of a shell (as CI may run pytest) inherits it ignored.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(out.glob("checkpoints/step_*/progress.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status and "Traceback" not in stderr, stderr[-3000:]
    assert (f"{said}: the run's complete checkpoints are kept; `python train.py --resume {out}` continues "
            "from the last one") in stderr
    assert not (out / "model").exists()
    resumed = run(TRAIN, "--resume", out, "--workers", 0)
    assert "resumed from" in resumed.stderr and (out / "model" / "model.safetensors").is_file()


def test_resume_refuses_another_number_of_processes(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 1, "--no-plots", *TINY,
        "--output-dir", out)
    config = json.loads((out / "run_config.json").read_text())
    assert config["num_processes"] == 1
    config["num_processes"] = 2  # as written by `accelerate launch --num_processes 2`
    (out / "run_config.json").write_text(json.dumps(config))
    proc = run(TRAIN, "--resume", out, "--workers", 0, check=False)
    assert "was written by a run of 2 process(es) and this one has 1" in error_line(proc)


def test_a_run_folder_is_never_shared_by_two_runs_nor_resumed_on_other_data(data_dir: Path, tmp_path: Path) -> None:
    """A new run refuses an --output-dir that holds an earlier run (they used to mix: the new run's checkpoints
    pruned in favour of the old run's later ones, and resumed from them); --overwrite replaces it. A run whose
    annotation rows changed since it started is not resumed (it used to go on, on a shifted split)."""
    train_csv = tmp_path / "train.csv"
    shutil.copy(data_dir / "train.csv", train_csv)
    out = tmp_path / "run"
    args = ("--train-csv", train_csv, "--no-image", "--no-decoder", "--no-plots", *TINY, "--output-dir", out)
    run(TRAIN, *args, "--epochs", 1)
    before = (out / "run_config.json").read_text()
    proc = run(TRAIN, *args, "--epochs", 2, check=False)
    assert (f"--output-dir {out} holds an earlier run (1 checkpoint(s), an exported model): `--resume {out}` "
            "continues it, --overwrite deletes it") in error_line(proc)
    assert (out / "run_config.json").read_text() == before  # untouched

    lines = train_csv.read_text().splitlines(keepends=True)
    train_csv.write_text("".join(lines[:5] + lines[6:]))  # one row gone
    proc = run(TRAIN, "--resume", out, "--workers", 0, check=False)
    assert f"the training data changed since the run in {out} started" in error_line(proc)
    train_csv.write_text("".join(lines))
    run(TRAIN, "--resume", out, "--workers", 0)  # the same data again: a finished run resumes (and re-exports)

    (out / "notes.txt").write_text("mine")  # not a run's file: --overwrite leaves it
    proc = run(TRAIN, *args, "--epochs", 2, "--overwrite")
    assert f"deleted the earlier run's files in {out}: checkpoints, model, log.jsonl, run_config.json" in proc.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10  # two epochs of 5 batches, from scratch
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]
    proc = run(TRAIN, "--resume", out, "--overwrite", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr

    # A run that stops before its first checkpoint leaves nothing to keep: the folder is reused as it is.
    proc = run(TRAIN, "--data-dir", data_dir, "--cache-features", tmp_path / "maps", "--train-tail-stages", 99,
               *TINY, "--no-plots", "--output-dir", tmp_path / "stopped", check=False)
    assert "--train-tail-stages 99: tf_efficientnet_lite0 has 7 stages" in error_line(proc)
    proc = run(TRAIN, *args, "--epochs", 1, "--output-dir", tmp_path / "stopped")
    assert f"deleted the earlier run's files in {tmp_path / 'stopped'}: log.jsonl, run_config.json" in proc.stderr
    assert all(line.get("step", 0) <= 5 for line in read_log(tmp_path / "stopped"))  # this run's lines alone


def test_train_skip_bad_images_finishes_and_reports_them(data_dir: Path, tmp_path: Path) -> None:
    frame = read_annotations(data_dir / "train.csv")
    _, val = train_val_split(frame, 0.2, seed=0)
    in_val = val["ImageID"].iloc[2]
    bad = sorted({"3.jpg", "4.jpg", in_val}, key=lambda i: frame.index[frame["ImageID"] == i][0])
    images = copy_images(data_dir, tmp_path / "images")
    break_image(images, "3.jpg", "missing")
    break_image(images, "4.jpg", "corrupt")
    break_image(images, in_val, "corrupt")
    out = tmp_path / "run"
    proc = run(TRAIN, "--data-dir", data_dir, "--image-dir", images, "--skip-bad-images", *TINY, "--epochs", 1,
               "--no-plots", "--output-dir", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["bad_images"]) == sorted(bad)
    assert f"skipped {len(bad)} unreadable image(s): " in proc.stderr
    assert (out / "model" / "model.safetensors").is_file()
    # The validation image that could not be read is scored as predict.py predicts it: from its caption alone. The
    # outputs that need the image did not predict it, and are scored on the other rows.
    predictions = np.load(out / "val_predictions.npz")
    row = list(val["ImageID"]).index(in_val)
    np.testing.assert_allclose(predictions["final"][row], predictions["caption"][row], atol=1e-6)
    others = np.arange(len(val)) != row
    assert not np.allclose(predictions["final"][others], predictions["caption"][others], atol=1e-3)
    for name in ("image", "fused", "decoder"):
        assert np.isnan(predictions[name][row]).all() and not np.isnan(predictions[name][others]).any()
        expected = compute_metrics(predictions[name][others], predictions["targets"][others])["samples_f1"]
        assert metrics["val"][name]["samples_f1"] == pytest.approx(expected)
    assert metrics["num_val_samples"] == NUM_VAL and "val_rows_not_predicted" not in metrics

    # A model without a caption branch cannot predict that row at all: it is left out of the scores, and counted, as
    # predict.py leaves it without labels (it was scored as the prediction of a blank image).
    proc = run(TRAIN, "--data-dir", data_dir, "--image-dir", images, "--skip-bad-images", *TINY, "--epochs", 1,
               "--no-plots", "--no-caption", "--no-decoder", "--output-dir", tmp_path / "image_only")
    metrics = json.loads((tmp_path / "image_only" / "metrics.json").read_text())
    predictions = np.load(tmp_path / "image_only" / "val_predictions.npz")
    assert np.isnan(predictions["final"][row]).all() and not np.isnan(predictions["final"][others]).any()
    assert metrics["num_val_samples"] == NUM_VAL - 1 and metrics["val_rows_not_predicted"] == 1
    expected = compute_metrics(predictions["final"][others], predictions["targets"][others])
    assert metrics["val"]["final"]["samples_f1"] == pytest.approx(expected["samples_f1"])
    assert f"1 of {NUM_VAL} validation rows not scored" in proc.stderr


def test_train_finds_images_as_predict_does_and_refuses_data_it_cannot_learn_from(data_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """Images beside the CSV (no data/ folder) are found, as predict.py finds them. A missing image folder, a folder
    without any of the images (with --skip-bad-images it trained on nothing and exported an untrained model), one
    label in all (a scikit-learn traceback after a whole epoch) or a CSV with no rows stop the run at once."""
    flat = tmp_path / "flat"
    shutil.copytree(data_dir / "data", flat)
    shutil.copy(data_dir / "train.csv", flat / "train.csv")
    run(TRAIN, "--data-dir", flat, *TINY, "--max-steps", 1, "--epochs", 1, "--no-plots", "--no-decoder",
        "--output-dir", tmp_path / "run")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    lines = (data_dir / "train.csv").read_text().splitlines()
    one_label = tmp_path / "one.csv"
    one_label.write_text("\n".join([lines[0]] + [re.sub(r"^([^,]+),[^,]*,", r"\1,3,", line)
                                                   for line in lines[1:] if re.match(r"^\d+\.jpg,", line)]) + "\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text(lines[0] + "\n")
    for args, said in (
            (("--data-dir", data_dir, "--image-dir", tmp_path / "nowhere"),
             f"the image folder {tmp_path / 'nowhere'} does not exist: give --image-dir"),
            (("--data-dir", data_dir, "--image-dir", empty, "--skip-bad-images"),
             f"none of the {NUM_TRAIN} images of {data_dir / 'train.csv'} is in {empty}"),
            (("--train-csv", one_label, "--image-dir", data_dir / "data"),
             f"{one_label}: every row has the one label 3: there is nothing to tell apart"),
            (("--train-csv", header_only, "--image-dir", data_dir / "data"), f"{header_only} has no data rows")):
        proc = run(TRAIN, *args, *TINY, "--output-dir", tmp_path / "refused", check=False)
        assert said in error_line(proc)
        assert not (tmp_path / "refused").exists()


def test_an_empty_caption_vocabulary_is_warned_of(data_dir: Path, tmp_path: Path) -> None:
    proc = run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", *TINY, "--max-steps", 1, "--epochs", 1,
               "--no-plots", "--min-word-freq", 100000, "--output-dir", tmp_path / "run")
    assert ("the caption vocabulary is empty (no word occurs 100000 times: lower --min-word-freq): the caption branch "
            "sees nothing but unknown words and can learn only how often each label occurs") in proc.stderr


def test_train_reports_a_bad_csv_with_file_and_line(data_dir: Path, tmp_path: Path) -> None:
    lines = (data_dir / "train.csv").read_text().splitlines()
    lines[3] = re.sub(r"^(\d+\.jpg),[^,]*,", r"\1,1 x,", lines[3])
    bad = tmp_path / "train.csv"
    bad.write_text("\n".join(lines) + "\n")
    proc = run(TRAIN, "--train-csv", bad, "--image-dir", data_dir / "data", *TINY, "--epochs", 1,
               "--output-dir", tmp_path / "run", check=False)
    line = error_line(proc)
    assert f"{bad}, line 4: label 'x' is not a non-negative integer" in line


# ---------------------------------------------------------------------------------------------------------- predict

def test_predict_writes_one_row_per_input_in_order_by_the_stored_thresholds(run_dir: Path, data_dir: Path,
                                                                           tmp_path: Path) -> None:
    # A copy of the model whose stored thresholds let every even class through and no odd one.
    model_dir = tmp_path / "model"
    shutil.copytree(run_dir / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["thresholds"] = [0.0 if c % 2 == 0 else 1.01 for c in range(len(LABELS))]
    (model_dir / "config.json").write_text(json.dumps(config))
    codec = LabelCodec.from_dict(config["codec"])
    assert list(codec.label_ids) == [label.id for label in LABELS]  # original ids (no 5), not class indices

    out, probs = tmp_path / "predictions.csv", tmp_path / "probabilities.csv"
    run(PREDICT, "--checkpoint", model_dir, "--data-dir", data_dir, "--output", out, "--probabilities", probs,
        "--batch-size", 5, "--workers", 0)  # 12 rows in batches of 5, 5, 2
    cached = tmp_path / "cached.csv"  # the same from the uint8 image cache (built by this call)
    run(PREDICT, "--checkpoint", model_dir, "--data-dir", data_dir, "--output", tmp_path / "cached_labels.csv",
        "--probabilities", cached, "--batch-size", 5, "--workers", 0, "--image-cache", tmp_path / "cache")
    np.testing.assert_allclose(pd.read_csv(cached).iloc[:, 1:].to_numpy(), pd.read_csv(probs).iloc[:, 1:].to_numpy(),
                               atol=2e-6)
    expected_ids = list(read_annotations(data_dir / "test.csv")["ImageID"])
    rows = read_rows(out)
    assert read_header(out) == ["ImageID", "Labels"] and [r["ImageID"] for r in rows] == expected_ids
    even = " ".join(str(label.id) for label in LABELS[::2])
    assert [r["Labels"] for r in rows] == [even] * NUM_TEST

    assert read_header(probs) == ["ImageID", *map(str, codec.label_ids)]
    prob_rows = read_rows(probs)
    assert [r["ImageID"] for r in prob_rows] == expected_ids
    p = np.array([[float(r[str(i)]) for i in codec.label_ids] for r in prob_rows])
    assert ((p >= 0) & (p <= 1)).all() and len({tuple(row) for row in p}) == NUM_TEST  # a prediction per row


def test_the_python_api_predicts_what_predict_py_writes(run_dir: Path, caption_only: Path, image_only_bf16: Path,
                                                        data_dir: Path, tmp_path: Path) -> None:
    import multimodal
    from PIL import Image

    frame = read_annotations(data_dir / "test.csv")
    out, probs = tmp_path / "predictions.csv", tmp_path / "probabilities.csv"
    run(PREDICT, "--checkpoint", run_dir / "model", "--data-dir", data_dir, "--output", out, "--probabilities", probs,
        "--workers", 0)
    expected = pd.read_csv(probs).iloc[:, 1:].to_numpy()
    model = multimodal.MultimodalClassifier.from_pretrained(run_dir / "model")
    paths = [data_dir / "data" / image_id for image_id in frame["ImageID"]]
    captions = list(frame["Caption"])
    np.testing.assert_allclose(model.predict_probabilities(paths, captions, batch_size=5), expected, atol=2e-6)
    labels = model.predict(paths, captions)
    assert [" ".join(map(str, ids)) for ids in labels] == [r["Labels"] for r in read_rows(out)]
    assert all(labels)  # at least one label each, as predict.py writes
    # In-memory images in another mode are converted as files are read; the caller's training mode is restored.
    rgba = [Image.open(p).convert("RGBA") for p in paths[:3]]
    model.train()
    np.testing.assert_allclose(model.predict_probabilities(rgba, captions[:3]), expected[:3], atol=2e-6)
    assert model.training
    model.eval()
    assert model.predict_probabilities([Image.open(paths[0]).convert("L")], captions[:1]).shape == (1, len(LABELS))
    as_array = np.asarray(Image.open(paths[0]).convert("RGB"))  # a uint8 array is an image too
    np.testing.assert_allclose(model.predict_probabilities([as_array], captions[:1]),
                               model.predict_probabilities([Image.open(paths[0])], captions[:1]), atol=1e-6)
    with pytest.raises(ValueError, match=rf"thresholds must be a number or {len(LABELS)} numbers, one per class"):
        model.predict(paths[:1], captions[:1], thresholds=[0.5, 0.5])
    assert model.predict(paths[:2], captions[:2], thresholds=[0.3]) == model.predict(paths[:2], captions[:2],
                                                                                     thresholds=0.3)
    with pytest.raises(TypeError, match=r"`images` takes one item per input, in a list: for a single one, \[image\]"):
        model.predict(Image.open(paths[0]), captions[:1])
    with pytest.raises(TypeError, match=r"`images` as one array must be N x H x W x C .*: for a single image, "):
        model.predict(as_array, captions[:1])  # its rows were taken for images
    for bad in (float("nan"), -1, "0.5"):  # refused as predict.py refuses them (NaN kept the top label alone)
        with pytest.raises(ValueError, match="thresholds must be"):
            model.predict(paths[:1], captions[:1], thresholds=bad)
        with pytest.raises(ValueError, match="thresholds must be"):
            multimodal.predict_to_csv(model, pd.read_csv(data_dir / "test.csv"), data_dir / "data",
                                      tmp_path / "t.csv", thresholds=bad, workers=0)
    with pytest.raises(ValueError, match="probabilities and output name the same file"):
        multimodal.predict_to_csv(model, pd.read_csv(data_dir / "test.csv"), data_dir / "data", tmp_path / "t.csv",
                                  probabilities=tmp_path / "t.csv", workers=0)
    # Images the API cannot take are refused with their position and what it takes (PIL and pathlib failed on them
    # with messages that said neither); a grey H x W x 1 array and a generator are taken.
    grey = np.asarray(Image.open(paths[0]).convert("L"))
    np.testing.assert_allclose(model.predict_probabilities([grey[..., None]], captions[:1]),
                               model.predict_probabilities([grey], captions[:1]), atol=1e-6)
    np.testing.assert_allclose(model.predict_probabilities(p for p in paths[:2]), model.predict_probabilities(
        paths[:2]), atol=1e-6)
    for bad, error, said in ((as_array.astype(np.float32), ValueError, r"images\[1\]: an array must be uint8"),
                             (as_array.transpose(2, 0, 1), ValueError, r"images\[1\]: an array must be uint8, H x W"),
                             (as_array[0, :, 0], ValueError, "an array must be uint8"),
                             (np.zeros((0, 0, 3), np.uint8), ValueError, "not empty"),
                             (Image.new("RGB", (0, 0)), ValueError, r"images\[1\] is an empty image \(0 x 0\)"),
                             (torch.zeros(3, 8, 8), TypeError, r"images\[1\] is a Tensor: .* goes to predict_proba"),
                             (b"\xff\xd8", TypeError, r"images\[1\] is a bytes: give a file path")):
        with pytest.raises(error, match=said):
            model.predict_probabilities([paths[0], bad], captions[:2])
    # Missing captions (None, or NaN: pandas' empty cell) are empty, here and in predict_to_csv.
    blank = model.predict_probabilities(paths[:2], ["", ""])
    np.testing.assert_allclose(model.predict_probabilities(paths[:2], [None, float("nan")]), blank, atol=1e-7)
    np.testing.assert_allclose(model.predict_probabilities(paths[:2]), blank, atol=1e-7)
    (tmp_path / "empty.csv").write_text(f"ImageID,Caption\n{paths[0].name},\n{paths[1].name},\n")
    result = multimodal.predict_to_csv(model, pd.read_csv(tmp_path / "empty.csv"), data_dir / "data",
                                       tmp_path / "api.csv", keep_probabilities=True, workers=0)  # no accelerator
    np.testing.assert_allclose(result["probabilities"], blank, atol=2e-6)
    with pytest.raises(ValueError, match=rf"image branch: give images.*captions alone.*images=\[None\] \* {NUM_TEST}"):
        model.predict(captions=captions)
    # An input without an image (None) gets the caption head's probabilities, as predict.py --skip-bad-images gives
    # an unreadable image; the others are unchanged.
    mixed = model.predict_probabilities([paths[0], None, paths[2]], captions[:3], batch_size=2)
    np.testing.assert_allclose(mixed[[0, 2]], expected[[0, 2]], atol=2e-6)
    with torch.no_grad():
        ids, lengths = encode_captions(model.tokenizer, [captions[1]], model.config.max_caption_length)
        caption = torch.sigmoid(model.caption_head(model.caption_encoder(ids, lengths))).numpy()
    np.testing.assert_allclose(mixed[1:2], caption, atol=2e-6)
    assert not np.allclose(mixed[1], expected[1], atol=1e-3)
    assert len(model.predict([None] * 3, captions[:3])) == 3
    image_only = multimodal.MultimodalClassifier.from_pretrained(image_only_bf16 / "model")
    with pytest.raises(ValueError, match=r"images \[1\] are None, and this model has no caption branch"):
        image_only.predict([paths[0], None], batch_size=1)  # the position in the whole list, not in its batch
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        model.predict(paths[:3], captions[:2])
    with pytest.raises(TypeError, match=r"`images` takes one item per input, in a list: for a single one, \[image\]"):
        model.predict(str(paths[0]), [captions[0]])
    assert model.predict([paths[0]], [captions[0]]) == labels[:1] and model.predict([], []) == []
    # A caption model predicts from captions alone.
    captioner = multimodal.MultimodalClassifier.from_pretrained(caption_only)
    assert len(captioner.predict(captions=captions)) == NUM_TEST
    assert multimodal.__version__ == "0.1.0"


def test_predict_cuts_captions_where_training_did(data_dir: Path, tmp_path: Path) -> None:
    """``--max-caption-length`` is part of the model: `predict.py` reproduces the run's validation probabilities."""
    out = tmp_path / "run"
    run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 2, "--no-plots", *TINY,
        "--max-caption-length", 3, "--output-dir", out)
    assert json.loads((out / "model" / "config.json").read_text())["model"]["max_caption_length"] == 3
    held_out = json.loads((out / "metrics.json").read_text())["val_source_rows"]
    val = pd.read_csv(data_dir / "train.csv", dtype=str, keep_default_na=False).iloc[held_out]
    assert sum(len(c.split()) > 3 for c in val["Caption"]) >= 3  # captions that the model reads cut
    val_csv = tmp_path / "val.csv"
    val.to_csv(val_csv, index=False)
    probs = tmp_path / "probs.csv"
    run(PREDICT, "--checkpoint", out / "model", "--csv", val_csv, "--image-dir", data_dir / "data",
        "--output", tmp_path / "labels.csv", "--probabilities", probs, "--workers", 0)
    np.testing.assert_allclose(pd.read_csv(probs).iloc[:, 1:].to_numpy(),
                               np.load(out / "val_predictions.npz")["final"], atol=1e-5)


def test_predict_scores_a_labelled_csv_as_the_label_sets_it_wrote(caption_only: Path, data_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A CSV with a Labels column is scored too; the scores are those of the written label sets (recomputed here
    from the two CSVs with scikit-learn), and a label the model does not know stops the run before predicting."""
    out, scores = tmp_path / "predictions.csv", tmp_path / "scores.json"
    proc = run(PREDICT, "--checkpoint", caption_only, "--csv", data_dir / "train.csv", "--output", out,
               "--metrics", scores, "--workers", 0, "--threshold", 0.3)
    m = json.loads(scores.read_text())
    truth = read_annotations(data_dir / "train.csv")
    rows = read_rows(out)
    assert [r["ImageID"] for r in rows] == list(truth["ImageID"])
    ids = [label.id for label in LABELS]
    y_true = np.array([[i in labels for i in ids] for labels in truth["Labels"]])
    y_pred = np.array([[str(i) in r["Labels"].split() for i in ids] for r in rows])
    from sklearn.metrics import f1_score
    for average in ("samples", "micro", "macro"):
        assert m[f"{average}_f1"] == pytest.approx(f1_score(y_true, y_pred, average=average, zero_division=0))
    assert m["rows_scored"] == NUM_TRAIN and m["rows_not_predicted"] == 0 and m["thresholds"] == [0.3] * len(ids)
    assert list(m["per_class"]) == [str(i) for i in ids]
    assert [c["support"] for c in m["per_class"].values()] == y_true.sum(0).tolist()
    assert [c["name"] for c in m["per_class"].values()] == CLASS_NAMES
    assert 0 <= m["map"] <= 1 and m["csv"] == str(data_dir / "train.csv")
    assert f"samples F1 {m['samples_f1']:.4f}" in proc.stderr

    lines = (data_dir / "train.csv").read_text().splitlines(keepends=True)
    image_id, _, caption = lines[3].split(",", 2)
    bad_csv = tmp_path / "unknown_label.csv"
    bad_csv.write_text("".join(lines[:3]) + f"{image_id},1 5,{caption}" + "".join(lines[4:]))  # the demo has no 5
    refused = run(PREDICT, "--checkpoint", caption_only, "--csv", bad_csv, "--output", tmp_path / "bad.csv",
                  "--workers", 0, check=False)
    message = error_line(refused)
    assert str(bad_csv) in message and f"data row 3 (ImageID {image_id!r})" in message and "5" in message
    assert not (tmp_path / "bad.csv").exists()
    unlabelled = run(PREDICT, "--checkpoint", caption_only, "--csv", data_dir / "test.csv", "--output",
                     tmp_path / "t.csv", "--metrics", tmp_path / "t.json", "--workers", 0, "--mixed-precision", "fp16",
                     check=False)
    assert "Labels column" in error_line(unlabelled) and not (tmp_path / "t.json").exists()
    assert "fp16 mixed precision does not run on a CPU" in unlabelled.stderr  # Accelerate says nothing of it


def test_predict_a_folder_without_csv_with_a_threshold_override(run_dir: Path, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    proc = run(PREDICT, "--checkpoint", run_dir / "model", "--image-dir", data_dir / "data", "--output", out,
               "--threshold", 1.01, "--workers", 0, "--mixed-precision", "bf16")  # bf16 autocast on CPU works too
    rows = read_rows(out)
    assert [r["ImageID"] for r in rows] == sorted(p.name for p in (data_dir / "data").iterdir())
    assert proc.stderr.count("empty captions") == 1  # one warning, not one per image or batch
    # --threshold overrides the stored ones: nothing reaches 1.01, so each image gets its single most probable label
    assert all(len(r["Labels"].split()) == 1 for r in rows)


def test_a_folder_to_predict_includes_its_subfolders(data_dir: Path, tmp_path: Path) -> None:
    """Without a CSV every image under --image-dir is predicted, in subfolders too (they were skipped unsaid), named
    by its path below the folder, which is how the loaders find it."""
    from multimodal.inference import folder_frame
    names = sorted(p.name for p in (data_dir / "data").iterdir())[:3]
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(data_dir / "data" / names[0], tmp_path / names[0])
    shutil.copy(data_dir / "data" / names[1], tmp_path / "sub" / names[1])
    shutil.copy(data_dir / "data" / names[2], tmp_path / "sub" / "deeper" / "Photo.JFIF")
    (tmp_path / "sub" / "notes.txt").write_text("not an image")
    for hidden in (".ipynb_checkpoints/0-checkpoint.jpg", "__MACOSX/._x.jpg", ".thumb.jpg"):  # not images to predict
        (tmp_path / hidden).parent.mkdir(exist_ok=True)
        shutil.copy(data_dir / "data" / names[0], tmp_path / hidden)
    frame = folder_frame(tmp_path)
    assert list(frame["ImageID"]) == sorted([names[0], f"sub/{names[1]}", "sub/deeper/Photo.JFIF"])
    assert all((tmp_path / image_id).is_file() for image_id in frame["ImageID"])


def test_predict_no_draft_decodes_large_jpegs_at_full_size_as_validation_does(run_dir: Path, data_dir: Path,
                                                                              tmp_path: Path) -> None:
    """By default predict.py decodes a JPEG at least twice the model's input at a reduced scale (faster); --no-draft
    decodes it whole, as train.py's validation does, so --metrics reproduces the validation's scores."""
    from PIL import Image
    images = tmp_path / "large"
    images.mkdir()
    names = sorted(p.name for p in (data_dir / "data").iterdir())[:8]
    for name in names:  # 8x the demo's 32 px: the decoder can scale these down by 1/2 and 1/4
        Image.open(data_dir / "data" / name).resize((256, 256), Image.BICUBIC).save(images / name, quality=95)
    model = MultimodalClassifier.from_pretrained(run_dir / "model")
    whole = model.predict_probabilities([Image.open(images / n) for n in names])  # PIL images: decoded whole
    probs = {}
    for flag in ((), ("--no-draft",)):
        out = tmp_path / f"p{len(flag)}.csv"
        run(PREDICT, "--checkpoint", run_dir / "model", "--image-dir", images, "--output", tmp_path / "labels.csv",
            "--probabilities", out, "--workers", 0, *flag)
        probs[flag] = pd.read_csv(out).iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(probs[("--no-draft",)], whole, atol=1e-5)
    assert np.abs(probs[()] - whole).max() > 1e-4  # the reduced-scale decode gives other pixels


def test_train_fraction_shrinks_training_and_keeps_the_validation_split(caption_only: Path, data_dir: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "half"
    run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 1, "--no-plots", *TINY,
        "--train-fraction", 0.5, "--output-dir", out)
    full = json.loads((caption_only.parent / "run_config.json").read_text())
    half = json.loads((out / "run_config.json").read_text())
    assert half["args"]["train_fraction"] == 0.5
    assert half["train_rows"] == round(full["train_rows"] / 2) and half["val_rows"] == full["val_rows"]
    full_val = json.loads((caption_only.parent / "metrics.json").read_text())["val_source_rows"]
    assert json.loads((out / "metrics.json").read_text())["val_source_rows"] == full_val  # the same validation rows


def test_split_seed_keeps_the_validation_split_while_the_seed_changes_the_model(caption_only: Path, data_dir: Path,
                                                                               tmp_path: Path) -> None:
    """``--split-seed``: members of an ensemble differ in initialisation and data order but share a split."""
    out = tmp_path / "member"
    run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 1, "--no-plots", *TINY,
        "--seed", 7, "--split-seed", 0, "--output-dir", out)
    reference = caption_only.parent
    assert json.loads((reference / "run_config.json").read_text())["args"]["split_seed"] == 0  # resolved from --seed
    assert json.loads((out / "run_config.json").read_text())["args"]["split_seed"] == 0
    held_out = json.loads((out / "metrics.json").read_text())["val_source_rows"]
    assert held_out == json.loads((reference / "metrics.json").read_text())["val_source_rows"]
    frame = read_annotations(data_dir / "train.csv")
    assert held_out == train_val_split(frame.assign(_row=range(len(frame))), 0.2, 0)[1]["_row"].tolist()
    assert held_out != train_val_split(frame.assign(_row=range(len(frame))), 0.2, 7)[1]["_row"].tolist()  # --seed 7
    mine = load_file(str(out / "model" / "model.safetensors"))
    theirs = load_file(str(caption_only / "model.safetensors"))
    assert any(not torch.equal(mine[k], theirs[k]) for k in mine)  # another initialisation and data order


def test_runs_of_neighbouring_seeds_do_not_share_their_epochs_data_orders(data_dir: Path, tmp_path: Path) -> None:
    """Accelerate shuffles epoch e with data_seed + e: with the seed itself as data_seed, the run of --seed 1 saw in
    epoch 0 the order of epoch 1 of the run of --seed 0 (ensemble members of seeds 0, 1, 2 ... shared orders)."""
    orders = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 2, "--no-plots", *TINY,
            "--seed", seed, "--split-seed", 0, "--output-dir", out)
        orders[seed] = json.loads((out / "metrics.json").read_text())["data_order_per_rank"][0]
        saved = json.loads((out / "run_config.json").read_text())["args"]
        assert saved["data_seed"] not in (0, 1)  # saved, so that a resume shuffles as the run did
    assert sorted(orders[0][1]) == sorted(orders[1][0])  # the same training rows (one split) ...
    assert orders[0][1] != orders[1][0] and orders[0][0] != orders[1][0]  # ... in other orders


def test_refit_on_every_row_logs_its_epochs_and_exports(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    proc = run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 2, "--no-plots", *TINY,
               "--val-fraction", 0, "--output-dir", out, "--mixed-precision", "fp16")  # float32 on a CPU, warned
    assert "fp16 mixed precision does not run on a CPU" in proc.stderr
    assert json.loads((out / "run_config.json").read_text())["train_rows"] == NUM_TRAIN
    epochs = [r for r in read_log(out) if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(np.isfinite(r["train_epoch/loss"]) for r in epochs)
    assert re.search(r"epoch 1: loss [0-9.]+\n", proc.stderr), proc.stderr[-2000:]
    assert "val" not in json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "model" / "config.json").read_text())["thresholds"] is None
    MultimodalClassifier.from_pretrained(out / "model")
    for bad, said in ((("--val-fraction", 0, "--tune-thresholds"), "--tune-thresholds needs a validation split"),
                      (("--train-fraction", 0), "--train-fraction must be in (0, 1]"),
                      (("--image-attention-temperature", 0), "--image-attention-temperature must be above 0"),
                      (("--threshold", 1.5), "--threshold must be in (0, 1)"),
                      (("--threshold", 0.6, "--tune-thresholds"), "--threshold and --tune-thresholds"),
                      (("--val-fraction", 1.0), "--val-fraction must be in [0, 1), got 1.0"),
                      (("--no-image", "--no-caption"), "leave no branch to train"),
                      (("--combine", "fused_decoder", "--no-decoder"), "not with --no-decoder"),
                      (("--modality-dropout", 0.7), "--modality-dropout must be in [0, 0.5]"),
                      (("--batch-size", 0), "--batch-size must be at least 1, got 0"),
                      (("--encoder", "no_such_net"), "--encoder 'no_such_net' is not a timm model name"),
                      (("--train-tail-stages", 1), "give --cache-features DIR"),
                      (("--asl-clip", 0.1), "it needs --asl-gamma-neg"),
                      (("--image-cache", tmp_path / "c", "--cache-features", tmp_path / "f"), "give one of them"),
                      (("--resume", tmp_path / "any", "--lr", 0.1),
                       "only --workers, --skip-bad-images, --[no-]verify-images may be given with it, not")):
        proc = run(TRAIN, "--data-dir", data_dir, *TINY, *bad, "--output-dir", tmp_path / "bad", check=False)
        assert proc.returncode == 2 and said in proc.stderr and not (tmp_path / "bad").exists(), proc.stderr


def test_a_given_threshold_is_stored_and_scored(data_dir: Path, tmp_path: Path) -> None:
    """``--threshold T`` (for a refit whose threshold was chosen on validation splits) is stored with the model for
    every class, and where there is a validation split the run scores its output at T beside 0.5."""
    out = tmp_path / "run"
    proc = run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--epochs", 1, "--no-plots", *TINY,
               "--threshold", 0.3, "--output-dir", out)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["thresholds"] == [0.3] * len(config["codec"]["label_ids"])
    metrics = json.loads((out / "metrics.json").read_text())
    saved = np.load(out / "val_predictions.npz")
    expected = compute_metrics(saved["final"], saved["targets"], 0.3)
    assert metrics["val_at_threshold"]["samples_f1"] == pytest.approx(expected["samples_f1"])
    assert metrics["val_at_threshold"]["samples_f1"] != pytest.approx(metrics["val"]["final"]["samples_f1"])
    assert f"at the stored threshold 0.3: {expected['samples_f1']:.4f}" in proc.stderr
    assert MultimodalClassifier.from_pretrained(out / "model").thresholds == [0.3] * len(config["codec"]["label_ids"])


def with_thresholds(model_dir: Path, thresholds: Any, out: Path) -> Path:
    """A copy of an exported model that stores ``thresholds`` (a list, or None for none)."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["thresholds"] = thresholds
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_the_decoder_weight_mixes_the_final_output_and_is_stored(data_dir: Path, tmp_path: Path) -> None:
    """``--combine fused_decoder --decoder-weight W``: the final output (validated, thresholded, exported) is
    (1 - W) * fused + W * the decoder's scores."""
    out = tmp_path / "run"
    run(TRAIN, "--data-dir", data_dir, "--no-image", "--epochs", 1, "--no-plots", *TINY, "--combine", "fused_decoder",
        "--decoder-weight", 0.2, "--output-dir", out)
    saved = np.load(out / "val_predictions.npz")
    np.testing.assert_allclose(saved["final"], 0.8 * saved["fused"] + 0.2 * saved["decoder"], atol=1e-6)
    assert not np.allclose(saved["final"], saved["fused"], atol=1e-3)
    model = MultimodalClassifier.from_pretrained(out / "model")
    assert (model.config.combine, model.config.decoder_weight) == ("fused_decoder", 0.2)


def test_predict_checkpoint_folders_are_collected_from_one_flag_or_several() -> None:
    from predict import DEFAULT_MODEL, get_args_parser
    parser = get_args_parser()
    assert parser.parse_args(["--checkpoint", "a", "b"]).checkpoint == ["a", "b"]
    assert parser.parse_args(["--checkpoint", "a", "--checkpoint", "b", "c"]).checkpoint == ["a", "b", "c"]
    assert parser.parse_args([]).checkpoint is None and DEFAULT_MODEL == "runs/latest/model"  # filled in when run


def test_predict_ensemble_averages_the_models_probabilities(run_dir: Path, caption_only: Path, data_dir: Path,
                                                             tmp_path: Path) -> None:
    # Two models with different branches and vocabularies, storing different thresholds: the mean of their
    # probabilities is thresholded at the mean of their thresholds, with a warning that they differ.
    num_labels = MultimodalClassifier.from_pretrained(caption_only).codec.num_labels
    low = [0.3 + 0.02 * c for c in range(num_labels)]
    members = {"full": with_thresholds(run_dir / "model", low, tmp_path / "full"),
               "caption": with_thresholds(caption_only, [0.8] * num_labels, tmp_path / "caption")}
    probs = {}
    for name, model_dir in members.items():
        probs[name] = tmp_path / f"{name}.csv"
        run(PREDICT, "--checkpoint", model_dir, "--data-dir", data_dir, "--output", tmp_path / f"{name}_labels.csv",
            "--probabilities", probs[name], "--batch-size", 5, "--workers", 0)
    out, mean = tmp_path / "ensemble.csv", tmp_path / "ensemble_probs.csv"
    full, caption = members.values()  # each after its own flag: both count (as after one flag, below)
    proc = run(PREDICT, "--checkpoint", full, "--checkpoint", caption, "--data-dir", data_dir, "--output", out,
               "--probabilities", mean, "--batch-size", 5, "--workers", 0)
    thresholds = (np.asarray(low) + 0.8) / 2
    assert f"ensemble of 2 models: mean probabilities, threshold {min(thresholds):g}..{max(thresholds):g} per " \
           "class (the mean of the stored ones)" in proc.stderr
    assert "store thresholds up to" in proc.stderr  # they differ by more than 0.1: the mean is only a guess
    single = [pd.read_csv(probs[n]).iloc[:, 1:].to_numpy() for n in ("full", "caption")]
    ensemble = pd.read_csv(mean).iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(ensemble, (single[0] + single[1]) / 2, atol=2e-6)
    assert not np.allclose(ensemble, single[0], atol=1e-3)  # both models count
    rows = read_rows(out)
    assert [r["ImageID"] for r in rows] == list(read_annotations(data_dir / "test.csv")["ImageID"])
    label_ids = [int(c) for c in pd.read_csv(mean).columns[1:]]
    for r, p in zip(rows, ensemble):  # the mean thresholds, at least one label
        expected = [i for i, v, t in zip(label_ids, p, thresholds) if v >= t] or [label_ids[int(np.argmax(p))]]
        assert r["Labels"] == " ".join(map(str, expected))
    # --threshold overrides the stored ones.
    proc = run(PREDICT, "--checkpoint", *members.values(), "--data-dir", data_dir, "--output", out, "--batch-size", 5,
               "--workers", 0, "--threshold", 0.5)
    assert "mean probabilities, threshold 0.5\n" in proc.stderr
    for r, p in zip(read_rows(out), ensemble):
        expected = [i for i, v in zip(label_ids, p) if v >= 0.5] or [label_ids[int(np.argmax(p))]]
        assert r["Labels"] == " ".join(map(str, expected))


def test_caption_only_model_needs_no_images(caption_only: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    run(PREDICT, "--checkpoint", caption_only, "--csv", data_dir / "test.csv", "--image-dir", tmp_path / "nowhere",
        "--output", out, "--workers", 0)
    rows = read_rows(out)
    assert [r["ImageID"] for r in rows] == list(read_annotations(data_dir / "test.csv")["ImageID"])
    assert all(r["Labels"] for r in rows)


def test_predict_stops_on_a_corrupt_image_naming_it(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    # (A missing image is found up front by the check train.py runs too: see the train test.)
    images = copy_images(data_dir, tmp_path / "images")
    break_image(images, f"{NUM_TRAIN + 5}.jpg", "corrupt")
    proc = run(PREDICT, "--checkpoint", run_dir / "model", "--csv", data_dir / "test.csv", "--image-dir", images,
               "--output", tmp_path / "predictions.csv", "--batch-size", 4, "--workers", 2, check=False)
    line = error_line(proc)  # raised in a DataLoader worker, still reported as one line
    assert str(images / f"{NUM_TRAIN + 5}.jpg") in line and "cannot decode" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no partial output
    break_image(images, f"{NUM_TRAIN + 9}.jpg", "corrupt")
    proc = run(PREDICT, "--checkpoint", run_dir / "model", "--csv", data_dir / "test.csv", "--image-dir", images,
               "--output", tmp_path / "predictions.csv", "--workers", 0, "--verify-images", check=False)
    assert re.search(r"2 image\(s\) cannot be decoded: data row 6 \(ImageID '53.jpg'\): .*; data row 10 "
                     r"\(ImageID '57.jpg'\)", error_line(proc))  # both, before any prediction
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_predict_reports_a_broken_model_folder_and_a_missing_input_in_one_line(caption_only: Path, data_dir: Path,
                                                                                tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(caption_only, model_dir)
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)  # a truncated download, say
    proc = run(PREDICT, "--checkpoint", model_dir, "--data-dir", data_dir, "--output", tmp_path / "p.csv", check=False)
    assert f"{model_dir / 'model.safetensors'}: not a readable safetensors file" in error_line(proc)
    proc = run(PREDICT, "--checkpoint", caption_only, "--output", tmp_path / "p.csv", check=False)
    assert "nothing to predict: give --data-dir, --csv or --image-dir" in error_line(proc)
    assert not (tmp_path / "p.csv").exists()


def test_predict_skip_bad_images_falls_back_on_the_caption(run_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    images = copy_images(data_dir, tmp_path / "images")
    bad = [f"{NUM_TRAIN + 1}.jpg", f"{NUM_TRAIN + 6}.jpg"]
    break_image(images, bad[0], "missing")
    break_image(images, bad[1], "corrupt")
    out, probs = tmp_path / "predictions.csv", tmp_path / "probabilities.csv"
    run(PREDICT, "--checkpoint", run_dir / "model", "--csv", data_dir / "test.csv", "--image-dir", images,
        "--output", out, "--probabilities", probs, "--skip-bad-images", "--batch-size", 4, "--workers", 0)
    frame = read_annotations(data_dir / "test.csv")
    rows = read_rows(out)
    assert [r["ImageID"] for r in rows] == list(frame["ImageID"]) and all(r["Labels"] for r in rows)
    report = read_rows(tmp_path / "predictions.bad_images.csv")
    assert [r["ImageID"] for r in report] == bad and all(r["error"] for r in report)

    # The bad rows got the caption branch's own prediction.
    model = MultimodalClassifier.from_pretrained(run_dir / "model")
    dataset = ImageCaptionDataset(frame[frame["ImageID"].isin(bad)], None, tokenizer=model.tokenizer)
    batch = Collator()([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        caption_probs = torch.sigmoid(model.caption_head(model.caption_encoder(batch["caption_ids"],
                                                                               batch["caption_lengths"]))).numpy()
    written = {r["ImageID"]: [float(r[str(i)]) for i in model.codec.label_ids] for r in read_rows(probs)}
    np.testing.assert_allclose([written[i] for i in bad], caption_probs, atol=2e-6)


def test_predict_skip_bad_images_without_caption_branch_gives_no_labels(image_only_bf16: Path, data_dir: Path,
                                                                        tmp_path: Path) -> None:
    images = copy_images(data_dir, tmp_path / "images")
    bad = f"{NUM_TRAIN + 2}.jpg"
    break_image(images, bad, "corrupt")
    out, probs = tmp_path / "predictions.csv", tmp_path / "probabilities.csv"
    run(PREDICT, "--checkpoint", image_only_bf16 / "model", "--csv", data_dir / "test.csv", "--image-dir", images,
        "--output", out, "--probabilities", probs, "--skip-bad-images", "--workers", 0)
    labels = {r["ImageID"]: r["Labels"] for r in read_rows(out)}
    assert len(labels) == NUM_TEST and labels.pop(bad) == "" and all(labels.values())
    assert all(v == "nan" for k, v in next(r for r in read_rows(probs) if r["ImageID"] == bad).items()
               if k != "ImageID")
    assert [r["ImageID"] for r in read_rows(tmp_path / "predictions.bad_images.csv")] == [bad]


def load_script(path: Path) -> Any:
    """``train.py`` or ``predict.py`` as a module (its parser and argument checks, without running it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,flags,message", [
    (TRAIN, ("--beam-width", 0), "--beam-width must be at least 1, got 0"),  # crashed after a whole epoch
    (TRAIN, ("--log-every", 0), "--log-every must be at least 1"),  # ZeroDivisionError mid-training
    (TRAIN, ("--image-size", 0), "--image-size must be at least 1"),
    (TRAIN, ("--caption-layers", 0), "--caption-layers must be at least 1"),
    (TRAIN, ("--workers", -1), "--workers must not be negative, got -1"),
    (TRAIN, ("--lr", -1), "--lr must not be negative"),
    (TRAIN, ("--warmup-steps", -5), "--warmup-steps must not be negative"),
    (TRAIN, ("--dropout", 1.5), "--dropout must be in [0, 1), got 1.5"),
    (TRAIN, ("--pretrained-file", "missing.pth"), "--pretrained-file: missing.pth is not a file"),
    (TRAIN, ("--label-names", "missing.csv"), "--label-names: missing.csv is not a file"),  # was silently ignored
    (TRAIN, ("--seed", -1), "--seed must be in [0, 2**32), got -1"),  # numpy's traceback
    (TRAIN, ("--split-seed", -1), "--split-seed must be in [0, 2**32), got -1"),
    (TRAIN, ("--lr", "nan"), "--lr must not be negative, got nan"),  # torch's traceback, after the model loaded
    (TRAIN, ("--asl-clip", "nan"), "--asl-clip must be in [0, 1), got nan"),
    (TRAIN, ("--image-attention-temperature", "nan"), "--image-attention-temperature must be above 0, got nan"),
    (PREDICT, ("--batch-size", 0), "--batch-size must be at least 1, got 0"),
    (PREDICT, ("--threshold", -1), "--threshold must be at least 0, got -1.0"),
    (PREDICT, ("--threshold", "nan"), "--threshold must be at least 0, got nan"),
    (PREDICT, ("--output", "p.csv", "--probabilities", "./p.csv"), "--output and --probabilities name the same file"),
    # a folder failed after the whole prediction, leaving a stray temporary file beside it
    (PREDICT, ("--output", "/tmp"), "--output /tmp is a folder: name a file in it"),
    (PREDICT, ("--metrics", "/tmp/"), "--metrics /tmp/ is a folder: name a file in it"),
    (PREDICT, ("--output", ""), "--output must name a file"),
    # the report of unreadable images beside the output deleted the probabilities written there
    (PREDICT, ("--output", "p.csv", "--probabilities", "p.bad_images.csv"), "name the same file (p.bad_images.csv)"),
])
def test_values_that_cannot_work_are_refused_before_anything_loads(script: Path, flags: tuple[Any, ...], message: str,
                                                                   capsys: pytest.CaptureFixture) -> None:
    module = load_script(script)
    parser = module.get_args_parser()
    with pytest.raises(SystemExit) as info:
        module.check_args(parser, parser.parse_args([str(f) for f in flags]))
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_predict_refuses_inputs_its_models_cannot_use_and_never_overwrites_the_input(
        run_dir: Path, caption_only: Path, data_dir: Path, tmp_path: Path) -> None:
    csv_copy = tmp_path / "test.csv"
    shutil.copy(data_dir / "test.csv", csv_copy)
    before = csv_copy.read_text()
    proc = run(PREDICT, "--checkpoint", run_dir / "model", "--csv", csv_copy, "--image-dir", data_dir / "data",
               "--output", csv_copy, check=False)  # it used to replace the captions with the predictions
    assert f"--output {csv_copy} is the input CSV: it would be overwritten" in error_line(proc)
    assert csv_copy.read_text() == before
    # Nor a file of the model or an input image (the next prediction, or training, then failed on it).
    config = (caption_only / "config.json").read_text()
    proc = run(PREDICT, "--checkpoint", caption_only, "--csv", csv_copy, "--output", caption_only / "config.json",
               check=False)
    assert f"--output {caption_only / 'config.json'} is in the model folder {caption_only}" in error_line(proc)
    assert (caption_only / "config.json").read_text() == config
    image = data_dir / "data" / read_rows(csv_copy)[0]["ImageID"]
    proc = run(PREDICT, "--checkpoint", run_dir / "model", "--csv", csv_copy, "--image-dir", data_dir / "data",
               "--probabilities", image, "--output", tmp_path / "p.csv", check=False)
    assert f"--probabilities {image} is an image of the image folder" in error_line(proc)
    proc = run(PREDICT, "--checkpoint", run_dir / "model", "--csv", csv_copy, "--output", tmp_path / "p.csv",
               check=False)
    assert f"the model reads images: give --image-dir (the folder of {csv_copy}'s images) or --data-dir" in \
        error_line(proc)
    proc = run(PREDICT, "--checkpoint", caption_only, "--image-dir", data_dir / "data", "--output",
               tmp_path / "p.csv", check=False)  # it used to give every image the same labels
    assert "the model reads captions only (no image branch), and a folder of images has none" in error_line(proc)
    assert not (tmp_path / "p.csv").exists()
    # --probabilities into a folder that does not exist yet (it used to lose the whole prediction)
    run(PREDICT, "--checkpoint", caption_only, "--csv", csv_copy, "--output", tmp_path / "p.csv",
        "--probabilities", tmp_path / "new" / "folder" / "probs.csv", "--workers", 0)
    assert len(read_rows(tmp_path / "new" / "folder" / "probs.csv")) == NUM_TEST


def test_predict_removes_the_temporary_files_a_killed_prediction_left(caption_only: Path, data_dir: Path,
                                                                       tmp_path: Path) -> None:
    """A predict.py killed by SIGKILL (no clean-up runs) left its private temporary files beside its output for good.
    The next prediction into that file deletes them a day later (a younger one may be a prediction still at work), and
    leaves other files, and other outputs' temporary files, alone."""
    old, young = tmp_path / "p.csv.11-aa.partial.tmp", tmp_path / "p.csv.12-bb.partial.tmp"
    other, mine = tmp_path / "q.csv.13-cc.partial.tmp", tmp_path / "p.csv.notes"
    for path in (old, young, other, mine):
        path.write_text("left")
    for path in (old, other, mine):
        os.utime(path, (0, 0))
    run(PREDICT, "--checkpoint", caption_only, "--data-dir", data_dir, "--output", tmp_path / "p.csv", "--workers", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.csv", young.name, other.name, mine.name])


def test_predict_refuses_a_launch_of_several_processes(caption_only: Path, data_dir: Path, tmp_path: Path) -> None:
    """Under `accelerate launch --num_processes 2` each process predicted every row into the same file (and one failed
    to rename the shared temporary file the other had renamed)."""
    proc = run(PREDICT, "--checkpoint", caption_only, "--data-dir", data_dir, "--output", tmp_path / "p.csv",
               env=script_env(WORLD_SIZE="2", RANK="1"), check=False)
    assert "predict.py predicts in one process (WORLD_SIZE=2, RANK=1 here): run it with `python predict.py`" in \
        error_line(proc)
    assert not list(tmp_path.iterdir())


def test_predict_reports_a_duplicate_image_id_with_file_and_line(run_dir: Path, data_dir: Path,
                                                                 tmp_path: Path) -> None:
    lines = (data_dir / "test.csv").read_text().splitlines()
    bad = tmp_path / "test.csv"
    bad.write_text("\n".join([*lines, lines[2]]) + "\n")
    proc = run(PREDICT, "--checkpoint", run_dir / "model", "--csv", bad, "--image-dir", data_dir / "data",
               "--output", tmp_path / "predictions.csv", check=False)
    line = error_line(proc)
    first_id = lines[2].split(",")[0]
    assert f"{bad}, line {len(lines) + 1}: duplicate ImageID '{first_id}' (first on line 3)" in line
    assert not (tmp_path / "predictions.csv").exists()


def test_model_flags_reach_the_model_config() -> None:
    sys.path.insert(0, str(REPO))
    from train import get_args_parser

    from multimodal.text import train_caption_tokenizer
    from multimodal.training import build_model_config
    frame = pd.DataFrame({"ImageID": ["0.jpg", "1.jpg"], "Labels": [(1,), (1, 3)], "Caption": ["a dog", "a cat"]})
    args = get_args_parser().parse_args(["--image-attention", "0.5", "--image-attention-temperature", "4",
                                         "--image-crop", "full", "--caption-word-skip", "--caption-word-dropout",
                                         "0.1"])
    codec, tokenizer = LabelCodec.from_labels(frame["Labels"]), train_caption_tokenizer(frame["Caption"])
    config = build_model_config(args, codec, tokenizer, frame)
    assert (config.image_attention, config.image_attention_temperature) == (0.5, 4.0)
    assert config.image_crop == "full" and config.caption_word_skip and config.max_labels == 2
    assert config.caption_word_dropout == 0.1
    default = build_model_config(get_args_parser().parse_args([]), codec, tokenizer, frame)
    assert default.image_attention_temperature == 1.0 and default.image_attention == 0.0


def test_a_new_runs_paths_are_saved_absolute_so_a_resume_from_elsewhere_finds_them(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """`--data-dir ../d1` was saved as typed: `--resume` from another working directory looked for ../d1 there."""
    sys.path.insert(0, str(REPO))
    from train import get_args_parser

    from multimodal.training import resolve_presets
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vectors.txt").write_text("dog 0.1 0.2\n")
    args = resolve_presets(get_args_parser().parse_args(
        ["--data-dir", "../d1", "--image-dir", "imgs", "--cache-features", "c", "--glove", "vectors.txt"]))
    here = Path.cwd()  # tmp_path as the OS names it
    assert args.data_dir == str(here / ".." / "d1") and args.image_dir == str(here / "imgs")  # `..` kept: see a link
    assert args.cache_features == str(here / "c") and args.glove == str(here / "vectors.txt")
    assert args.demo_dir == str(here / "data" / "demo") and args.output_dir is None
    assert resolve_presets(get_args_parser().parse_args(["--glove", "glove.6B.50d", "--no-caption"])).glove == \
        "glove.6B.50d"  # a package's name, not a path
    resumed = resolve_presets(get_args_parser().parse_args(["--resume", "r", "--image-dir", "imgs"]))
    assert resumed.image_dir == "imgs"  # a resume takes the run's saved paths (train.py refuses this one)


def test_settings_of_a_branch_that_is_off_are_warned_of(capsys) -> None:
    """An ablation run that keeps a branch's settings (`--no-image --image-attention 0.2`, `--no-decoder --beam-width
    7`) trained as if they were not given, unsaid (some such combinations were refused, most were not)."""
    sys.path.insert(0, str(REPO))
    from train import check_args, get_args_parser

    parser = get_args_parser()
    check_args(parser, parser.parse_args(["--no-image", "--image-attention", "0.2", "--modality-dropout", "0.2",
                                          "--no-decoder", "--beam-width", "7", "--caption-word-skip"]))
    assert capsys.readouterr().err == (
        "warning: --image-attention, --modality-dropout do nothing with --no-image (the image branch is off); "
        "--beam-width does nothing with --no-decoder (the label decoder is off)\n")
    check_args(parser, parser.parse_args(["--no-caption", "--caption-word-dropout", "0.1", "--no-decoder"]))
    assert capsys.readouterr().err == ("warning: --caption-word-dropout does nothing with --no-caption (the caption "
                                       "branch is off)\n")
    check_args(parser, parser.parse_args(["--no-image", "--caption-word-skip", "--beam-width", "7"]))
    assert capsys.readouterr().err == ""  # the settings of branches that are on


def test_a_run_stopped_by_max_steps_in_mid_epoch_resumes_to_its_export_keeping_its_log(data_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """--max-steps 3 of an epoch of 5 batches: the run had no checkpoint ("no complete checkpoint yet" on --resume);
    now it has one there, and resuming it (nothing left to train) validates and exports again without dropping the
    validation line it logged."""
    out = tmp_path / "run"
    run(TRAIN, "--data-dir", data_dir, "--no-image", "--no-decoder", "--max-steps", 3, "--no-plots", *TINY,
        "--output-dir", out)
    assert [p.name for p in CheckpointManager.complete(out)] == ["step_00000003"]
    logged = read_log(out)
    assert any(e.get("step") == 3 and e.get("epoch") == 0 and "val/final/samples_f1" in e for e in logged)
    exported = (out / "model" / "model.safetensors").read_bytes()
    resumed = run(TRAIN, "--resume", out, "--workers", 0)
    assert "resumed from" in resumed.stderr and "dropped" not in resumed.stderr
    after = read_log(out)
    assert after[: len(logged)] == logged and all("config" in e for e in after[len(logged):])  # the resume's config
    assert (out / "model" / "model.safetensors").read_bytes() == exported
