#!/usr/bin/env python3
"""Offline probes of finished training runs on their validation split (the numbers in `EXPLORATION.md`).

    python benchmarks/probe_runs.py average RUN RUN [RUN ...]   # samples F1 of each run and of their averaged probs
    python benchmarks/probe_runs.py flip RUN                    # test-time flip of the cached feature maps

``RUN`` is a `train.py` run folder with ``val_predictions.npz`` (every run with a validation split writes one). The
runs averaged must share the validation split (same ``--val-fraction`` and ``--seed``); this is checked. ``flip``
needs a run trained on cached feature maps (``--train-tail-stages``) whose cache is still valid: it scores the
exported model on the validation rows' maps as they are, mirrored left-right, and the mean of the two.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal.metrics import binarize, samples_f1  # noqa: E402


def score(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(samples_f1(binarize(probs, 0.5), targets.astype(bool)).mean())


def average(runs: list[Path]) -> dict[str, float]:
    loaded = {run.name: np.load(run / "val_predictions.npz") for run in runs}
    first = next(iter(loaded.values()))
    for name, z in loaded.items():
        if not np.array_equal(z["index"], first["index"]):
            raise SystemExit(f"{name}: not the same validation rows as {runs[0].name}")
    targets = first["targets"]
    result = {name: score(z["final"], targets) for name, z in loaded.items()}
    for k in range(2, len(runs) + 1):
        for combo in itertools.combinations(loaded, k):
            result[" + ".join(combo)] = score(np.mean([loaded[n]["final"] for n in combo], axis=0), targets)
    return result


def flip(run: Path) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from multimodal.annotations import read_annotations
    from multimodal.data import Collator, ImageCaptionDataset, train_val_split
    from multimodal.features import FeatureDataset, cached_features
    from multimodal.model import ImageEncoder, MultimodalClassifier
    args = json.loads((run / "run_config.json").read_text())["args"]
    if not args.get("train_tail_stages") or not args.get("cache_features"):
        raise SystemExit(f"{run}: not a run on cached feature maps (--train-tail-stages with --cache-features)")
    model = MultimodalClassifier.from_pretrained(run / "model").eval()
    model.tail_stages = args["train_tail_stages"]
    frame = read_annotations(Path(args["data_dir"]) / "train.csv")
    frame["_row"] = np.arange(len(frame))
    _, val = train_val_split(frame, args["val_fraction"], args["seed"])
    # The cache is keyed by the encoder as train.py built it, before its tail was fine-tuned: the pretrained weights.
    pretrained = ImageEncoder(model.config.image_encoder, pretrained=args.get("pretrained_file") or args["pretrained"])
    features = cached_features(pretrained, frame, Path(args["data_dir"]) / "data", model.config.image_size,
                               args["cache_features"], tail_stages=model.tail_stages, crop=model.config.image_crop)
    dataset = FeatureDataset(ImageCaptionDataset(val, None, model.codec, model.tokenizer,
                                                 max_caption_length=args["max_caption_length"]),
                             *features, rows=val["_row"])
    probs: dict[str, list[np.ndarray]] = {"as is": [], "mirrored": []}
    targets = []
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=128, collate_fn=Collator()):
            for name, maps in (("as is", batch["image_features"]), ("mirrored", batch["image_features"].flip(-1))):
                probs[name].append(model.predict_proba(caption_ids=batch["caption_ids"],
                                                       caption_lengths=batch["caption_lengths"],
                                                       image_features=maps).numpy())
            targets.append(batch["targets"].numpy())
    t = np.concatenate(targets)
    p = {k: np.concatenate(v) for k, v in probs.items()}
    return {"as is": score(p["as is"], t), "mirrored": score(p["mirrored"], t),
            "mean of both": score((p["as is"] + p["mirrored"]) / 2, t)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="probe", required=True)
    a = sub.add_parser("average", help="average the final probabilities of runs")
    a.add_argument("runs", nargs="+", type=Path)
    f = sub.add_parser("flip", help="test-time flip of the cached feature maps")
    f.add_argument("run", type=Path)
    args = p.parse_args()
    result = average(args.runs) if args.probe == "average" else flip(args.run)
    for name, value in result.items():
        print(f"{value:.4f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
