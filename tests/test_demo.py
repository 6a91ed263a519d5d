"""The synthetic demo dataset: deterministic, in the COMP5329 layout, with structured labels and partial captions."""
from __future__ import annotations

import csv
import functools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal import demo
from multimodal.demo import BY_ID, IMPLIES, LABELS, ensure_demo_data, make_demo_dataset

SMALL = dict(num_train=40, num_test=10, image_size=32)
WORD_TO_LABEL = {word: label.id for label in LABELS for word in label.words}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    root = make_demo_dataset(tmp_path_factory.mktemp("demo"))  # the default size: 900 images at 64 px
    return read_csv(root / "train.csv"), read_csv(root / "test.csv")


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = files(make_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = files(make_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = files(make_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a.keys() == c.keys() and a["train.csv"] != c["train.csv"]
    assert sum(a[name] != c[name] for name in a if name.endswith(".jpg")) > 45


def test_layout(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path, **SMALL)
    train, test = read_csv(root / "train.csv"), read_csv(root / "test.csv")
    assert list(train[0]) == ["ImageID", "Labels", "Caption"] and list(test[0]) == ["ImageID", "Caption"]
    assert [r["ImageID"] for r in train + test] == [f"{i}.jpg" for i in range(50)]
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted(f"{i}.jpg" for i in range(50))
    with Image.open(root / "data" / "7.jpg") as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    names = read_csv(root / "label_names.csv")
    assert [(int(r["label"]), r["name"]) for r in names] == [(label.id, label.name) for label in LABELS]
    assert 5 not in BY_ID and len(LABELS) == 8  # a gap in the ids, as the real data lacks 12


def test_label_structure(default_set: tuple[list[dict], list[dict]]) -> None:
    train, _ = default_set
    label_sets = [set(map(int, r["Labels"].split())) for r in train]
    assert all(labels and labels <= BY_ID.keys() for labels in label_sets)
    for label, implied in IMPLIES.items():
        with_label = [labels for labels in label_sets if label in labels]
        assert len(with_label) >= 20, label
        assert all(set(implied) <= labels for labels in with_label), label
    assert 0.65 < np.mean([1 in labels for labels in label_sets]) < 0.8  # person, like the real 76%
    assert 1.4 < np.mean([len(labels) for labels in label_sets]) < 1.8  # the real data: 1.55
    assert all(sum(label.id in labels for labels in label_sets) >= 20 for label in LABELS)


def test_captions_name_only_present_labels_and_only_some(default_set: tuple[list[dict], list[dict]]) -> None:
    train, test = default_set
    named = present = empty = 0
    for row in train:
        labels = set(map(int, row["Labels"].split()))
        mentioned = {WORD_TO_LABEL[w] for w in re.findall(r"[a-z]+", row["Caption"].lower()) if w in WORD_TO_LABEL}
        assert mentioned <= labels, row
        named, present, empty = named + len(mentioned), present + len(labels), empty + (row["Caption"] == "")
    assert 0.35 < named / present < 0.6  # the caption alone misses about half of the labels
    assert 0.05 < empty / len(train) < 0.15
    assert any(WORD_TO_LABEL.keys() & set(r["Caption"].lower().split()) for r in test)


def test_hidden_objects_show_less_of_their_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small, faint and half-covered objects leave far fewer pixels of their colour, so images alone are unsure."""
    def visible_pixels(hidden_rate: float) -> float:
        monkeypatch.setattr(demo, "HIDDEN_RATE", hidden_rate)
        red = np.array(BY_ID[1].colour)
        images = [np.asarray(demo.draw_image(np.random.default_rng([0, i]), (1,), 64), float) for i in range(40)]
        return float(np.mean([(np.linalg.norm(image - red, axis=-1) < 60).sum() for image in images]))

    assert visible_pixels(1.0) < 0.3 * visible_pixels(0.0)


def test_ensure_demo_data_generates_once_and_redoes_interrupted_runs(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    @functools.wraps(make_demo_dataset)  # keeps the signature, which ensure_demo_data checks arguments against
    def counting(root: Path, **kwargs) -> Path:
        calls.append(kwargs)
        return make_demo_dataset(root, **kwargs)

    monkeypatch.setattr(demo, "make_demo_dataset", counting)
    root = tmp_path / "demo"
    assert ensure_demo_data(root, **SMALL) == root and len(calls) == 1
    assert (root / "train.csv").is_file() and (root / demo.MARKER).is_file()
    ensure_demo_data(root, **SMALL)
    assert len(calls) == 1  # complete and same parameters: nothing to do
    (root / demo.MARKER).unlink()  # as if the first run had been interrupted
    ensure_demo_data(root, **SMALL)
    assert len(calls) == 2 and (root / demo.MARKER).is_file()
    ensure_demo_data(root, **{**SMALL, "seed": 1})  # other parameters: regenerate
    assert len(calls) == 3
    with pytest.raises(TypeError):
        ensure_demo_data(root, num_images=5)
    assert (root / demo.MARKER).is_file()  # a bad argument does not invalidate the data that is there
