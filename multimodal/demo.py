"""A small synthetic dataset in the COMP5329 layout, for demos, smoke runs and tests that need no real data.

Each image shows its labels as coloured shapes on a noisy background; each caption names some of them. Neither
modality is enough alone: about 30% of the objects are drawn small, faint or half-covered, and a caption names each
object only with probability 0.5 (and 10% of captions are empty), so image + caption beats either. Labels co-occur the
way real ones do: ``person`` is on ~70% of images, ``rider`` always comes with ``horse`` and ``person``, ``leash``
always with ``dog``; ~1.6 labels per image. Ids run 1..9 without 5, as the real data lacks 12.

Layout (as the real data): ``train.csv`` (ImageID,Labels,Caption), ``test.csv`` (ImageID,Caption),
``data/<id>.jpg`` (test ids continue after the train ids) and ``label_names.csv`` (label,name). Files are a pure
function of the arguments (per-image random streams, fixed JPEG settings), byte-identical for one Pillow version.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

DEMO_VERSION = 1  # bump when the generator's output changes, so that ensure_demo_data regenerates
MARKER = ".complete"


@dataclass(frozen=True)
class DemoLabel:
    id: int
    name: str
    shape: str
    colour: tuple[int, int, int]
    words: tuple[str, ...]  # caption words naming it; no word names two labels


LABELS = (
    DemoLabel(1, "person", "circle", (220, 40, 40), ("person", "man", "woman")),
    DemoLabel(2, "bicycle", "ring", (40, 90, 230), ("bicycle", "bike")),
    DemoLabel(3, "car", "square", (40, 180, 60), ("car", "vehicle")),
    DemoLabel(4, "dog", "triangle", (240, 150, 30), ("dog", "puppy")),
    DemoLabel(6, "horse", "bars", (150, 60, 200), ("horse", "pony")),
    DemoLabel(7, "rider", "star", (240, 230, 40), ("rider", "jockey")),
    DemoLabel(8, "leash", "cross", (30, 220, 220), ("leash", "lead")),
    DemoLabel(9, "kite", "diamond", (250, 250, 250), ("kite",)),
)
BY_ID = {label.id: label for label in LABELS}
IMPLIES = {7: (6, 1), 8: (4,)}  # a rider rides a horse and is a person; a leash holds a dog
PERSON_RATE = 0.72
BASE_RATES = {2: 0.1, 3: 0.14, 4: 0.14, 6: 0.12, 9: 0.08}
DEPENDENT_RATES = {7: 0.5, 8: 0.5}  # given the implied labels
HIDDEN_MODES = ("small", "faint", "occluded")
HIDDEN_RATE = 0.3
MENTION_RATE = 0.5
EMPTY_CAPTION_RATE = 0.1
SCENES = ("in a field", "on a street", "near the beach", "at the park", "outside", "on a sunny day", "at night",
          "in the snow", "by a river", "in a busy town")
OPENINGS = ("a photo of", "a picture showing", "there is", "we can see", "an image with", "look at")
NOTHING = ("a blurry photo", "a picture taken", "nothing much to see", "a quiet scene", "an old photo")


def make_demo_dataset(root: str | Path, num_train: int = 800, num_test: int = 100, image_size: int = 64,
                      seed: int = 0) -> Path:
    """Writes the demo dataset under ``root`` (files of the same names are overwritten).

    Args:
        root: output folder, created if needed.
        num_train: labelled images (``0.jpg`` .. ``{num_train - 1}.jpg``).
        num_test: unlabelled images, numbered after the training ones.
        image_size: side of the square images in pixels.
        seed: the generator's seed; image ``i`` depends only on ``(seed, i, image_size)``.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    for index in range(num_train + num_test):
        rng = np.random.default_rng([seed, index])
        labels = sample_labels(rng)
        image = draw_image(rng, labels, image_size)
        image.save(root / "data" / f"{index}.jpg", format="JPEG", quality=90)
        caption = write_caption(rng, labels)
        if index < num_train:
            train_rows.append(f"{index}.jpg,{' '.join(map(str, labels))},{_quote(caption)}")
        else:
            test_rows.append(f"{index}.jpg,{_quote(caption)}")
    _write_lines(root / "train.csv", ["ImageID,Labels,Caption", *train_rows])
    _write_lines(root / "test.csv", ["ImageID,Caption", *test_rows])
    _write_lines(root / "label_names.csv", ["label,name", *(f"{label.id},{label.name}" for label in LABELS)])
    return root


def ensure_demo_data(root: str | Path = "data/demo", **kwargs) -> Path:
    """Generates the demo dataset under ``root`` unless a complete one with the same parameters is there.

    The marker file ``root/.complete`` holds the parameters and is written last, so an interrupted generation is
    redone on the next call.

    Args:
        root: dataset folder.
        **kwargs: `make_demo_dataset` arguments (``num_train``, ``num_test``, ``image_size``, ``seed``).

    Returns:
        ``root`` as a Path.
    """
    bound = inspect.signature(make_demo_dataset).bind(root, **kwargs)  # a wrong argument fails here, not later
    bound.apply_defaults()
    root = Path(root)
    params = {key: value for key, value in bound.arguments.items() if key != "root"} | {"version": DEMO_VERSION}
    marker = root / MARKER
    if marker.is_file() and _read_json(marker) == params:
        return root
    marker.unlink(missing_ok=True)
    logger.info("Generating the demo dataset in %s (%s)", root, ", ".join(f"{k}={v}" for k, v in params.items()))
    make_demo_dataset(root, **kwargs)
    marker.write_text(json.dumps(params, sort_keys=True) + "\n")
    return root


def sample_labels(rng: np.random.Generator) -> tuple[int, ...]:
    """One image's label ids (sorted): independent base labels, then the labels they make possible."""
    labels = {1} if rng.random() < PERSON_RATE else set()
    labels |= {label for label, rate in BASE_RATES.items() if rng.random() < rate}
    for label, rate in DEPENDENT_RATES.items():
        needs = IMPLIES[label][0]  # the label that makes it possible (horse for rider, dog for leash)
        if needs in labels and rng.random() < rate:
            labels |= {label, *IMPLIES[label]}
    if not labels:
        labels.add(int(rng.choice(list(BASE_RATES))))
    return tuple(sorted(labels))


def draw_image(rng: np.random.Generator, labels: tuple[int, ...], size: int) -> Image.Image:
    """Draws each label's shape, some of them small, faint or half-covered, on a noisy background."""
    background = rng.integers(60, 160, size=3)
    pixels = background + rng.normal(0, 18, size=(size, size, 3))  # [H, W, 3]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for label in rng.permutation(labels):
        mode = rng.choice(HIDDEN_MODES) if rng.random() < HIDDEN_RATE else "normal"
        radius = size * (rng.uniform(0.04, 0.07) if mode == "small" else rng.uniform(0.1, 0.2))
        cx, cy = rng.uniform(radius, size - radius, size=2)
        colour = np.array(BY_ID[int(label)].colour)
        if mode == "faint":
            colour = 0.3 * colour + 0.7 * background
        _draw_shape(draw, BY_ID[int(label)].shape, cx, cy, radius, tuple(int(c) for c in colour))
        if mode == "occluded":  # a grey patch over most of the shape
            grey = tuple(int(v) for v in rng.integers(90, 130, size=1).repeat(3))
            dx = radius * rng.choice([-0.4, 0.4])
            draw.rectangle([cx - radius * 1.1 + dx, cy - radius * 1.1, cx + radius * 1.1 + dx, cy + radius * 1.1],
                           fill=grey)
    return image


def write_caption(rng: np.random.Generator, labels: tuple[int, ...]) -> str:
    """A templated caption naming each label with probability 0.5 (a synonym), or an empty one."""
    if rng.random() < EMPTY_CAPTION_RATE:
        return ""
    named = [f"a {rng.choice(BY_ID[int(label)].words)}" for label in rng.permutation(labels)
             if rng.random() < MENTION_RATE]
    scene = rng.choice(SCENES)
    if not named:
        return f"{rng.choice(NOTHING)} {scene}"
    things = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    if rng.random() < 0.5:
        return f"{rng.choice(OPENINGS)} {things} {scene}"
    return f"{scene[0].upper()}{scene[1:]}, {things}."


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, round(r / 3)))
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "bars":
        w = r / 4
        for x in (cx - 0.75 * r, cx, cx + 0.75 * r):
            draw.rectangle([x - w / 2, cy - r, x + w / 2, cy + r], fill=colour)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
