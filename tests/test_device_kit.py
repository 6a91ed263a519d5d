"""The kit that carries the dataset to the lent GPU machine (benchmarks/device): every image lands in exactly one
part, each part fits a call, and the device-side script unpacks what arrived and lists only those images."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None,
                                reason="needs git and bash")


def load_pack():
    spec = importlib.util.spec_from_file_location("device_pack", ROOT / "benchmarks" / "device" / "pack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def dataset(tmp_path) -> Path:
    """A COMP5329-shaped folder: 12 noisy JPEGs of about 23 KB each (noise does not compress)."""
    data = tmp_path / "comp5329"
    (data / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(data / "data" / f"{i}.jpg",
                                                                                   quality=95)
    pd.DataFrame({"ImageID": [f"{i}.jpg" for i in range(12)], "Labels": ["1"] * 12,
                  "Caption": [f"caption, {i}" for i in range(12)]}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"label": [1], "name": ["person"]}).to_csv(data / "label_names.csv", index=False)
    return data


def test_pack_and_unpack(dataset, tmp_path):
    pack = load_pack()
    tree = pack.tracked_bytes() / MIB
    parts_dir = tmp_path / "parts"
    budget_mib = 0.1  # beside the working tree and a 0.1 MiB margin: about 4 images (23 KB each) a part
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device" / "pack.py"), str(dataset), "--out",
                    str(parts_dir), "--weights", "none", "--margin-mib", "0.1",
                    "--call-mib", str(tree + 0.1 + budget_mib)], check=True, capture_output=True)
    parts = sorted(parts_dir.glob("part-*.tar"))
    assert len(parts) >= 3
    names = []
    for part in parts:
        assert part.stat().st_size <= budget_mib * MIB
        with tarfile.open(part) as tar:
            names += tar.getnames()
    images = sorted(n for n in names if n.startswith("data/"))
    assert images == sorted(f"data/{i}.jpg" for i in range(12))  # each image once
    with tarfile.open(parts[0]) as tar:
        assert {"train_full.csv", "label_names.csv"} <= set(tar.getnames())

    # The device side, with the second part not yet carried: only the images that arrived are listed.
    parts[1].unlink()
    unpacked = tmp_path / "unpacked"
    env = {**os.environ, "DEVICE_DATA": str(unpacked), "DEVICE_PARTS": str(parts_dir), "PYTHON": sys.executable,
           "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device" / "step.sh"), "unpack"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    listed = pd.read_csv(unpacked / "train.csv", dtype=str, keep_default_na=False)
    present = sorted(p.name for p in (unpacked / "data").iterdir())
    assert sorted(listed["ImageID"]) == present and 0 < len(present) < 12
    assert list(listed.columns) == ["ImageID", "Labels", "Caption"] and listed["Caption"].str.contains(",").all()
    # The rows refuse to start on part of the data.
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device" / "step.sh"), "rows"], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1 and f"only {len(present)} of 16000 images" in run.stderr


def test_pack_refuses_a_budget_too_small(dataset, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device" / "pack.py"), str(dataset), "--out",
                          str(tmp_path / "parts"), "--weights", "none", "--call-mib", "1"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "too little" in run.stderr
