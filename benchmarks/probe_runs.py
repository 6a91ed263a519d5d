#!/usr/bin/env python3
"""Offline probes of finished training runs on their validation split (the numbers in `EXPLORATION.md`).

    python benchmarks/probe_runs.py average RUN RUN [RUN ...]   # samples F1 of each run and of their averaged probs,
                                                                # at 0.5 and at the mean of the stored thresholds
    python benchmarks/probe_runs.py average --decoder-weight 0.2 --threshold 0.65 RUN RUN   # the same, of the
                                                                # decoder mix, at 0.65 too
    python benchmarks/probe_runs.py flip RUN                    # test-time flip of the cached feature maps
    python benchmarks/probe_runs.py errors RUN                  # missed and false labels per class, one threshold
    python benchmarks/probe_runs.py tfidf RUN                   # blended with TF-IDF + logistic regression
    python benchmarks/probe_runs.py stack RUN                   # a cross-fitted stack of the run's heads
    python benchmarks/probe_runs.py unseen RUN                  # on captions with words unseen in training, and not
    python benchmarks/probe_runs.py thresholds RUN              # single and per-class thresholds, held out
    python benchmarks/probe_runs.py common-threshold RUN RUN [RUN ...]   # one threshold for runs on different splits
    python benchmarks/probe_runs.py decoder-mix RUN RUN [RUN ...]        # the same with the decoder's scores mixed in

``RUN`` is a `train.py` run folder with ``val_predictions.npz`` (every run with a validation split writes one). The
runs averaged must share the validation split (same ``--val-fraction`` and ``--seed``); this is checked. ``flip``
needs a run trained on cached feature maps (``--train-tail-stages``) whose cache is still valid: it scores the
exported model on the validation rows' maps as they are, mirrored left-right, and the mean of the two. ``errors``
counts, per class, the labels the run's final output misses and those it adds, and scores single thresholds other
than 0.5. ``tfidf`` fits the `tfidf_logreg` row's model (its C) on the run's training rows and scores the mean of the
run's fused probabilities and the TF-IDF model's at several weights (chosen on the scored split: optimistic).
``stack`` asks whether the fused head combines the branches as well as their outputs allow: a logistic regression on
the logits of the image, caption, fused heads and the decoder's scores, fitted on one half of the validation rows and
scored on the other (2-fold cross-fitting), one model for all classes and one per class. ``unseen`` scores the run's
final output on the validation images whose caption has a word that none of the run's training captions has (the
default vocabulary's test: such words become ``<unk>``), and on the others. ``common-threshold`` takes runs of one
recipe on different splits and finds the one threshold that scores best on all of them together (the threshold a refit
on every labelled image can store, having no validation rows of its own), and, as an honest estimate of what it does
on new data, scores each run at the threshold chosen on the other runs alone. ``decoder-mix`` does the same over
pairs of a threshold and a weight W of the label decoder's beam-search scores in the final output, (1 - W) * fused +
W * decoder (what ``--combine fused_decoder --decoder-weight W`` predicts; W = 0 is the fused head alone).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multimodal.metrics import binarize, describe_thresholds, mean_thresholds, samples_f1  # noqa: E402


def score(probs: np.ndarray, targets: np.ndarray, threshold: Any = 0.5) -> float:
    return float(samples_f1(binarize(probs, threshold), targets.astype(bool)).mean())


def decoder_mixed(predictions: Any, weight: float) -> np.ndarray:
    """A run's output with the decoder's scores mixed in, as ``--combine fused_decoder --decoder-weight W`` predicts
    (`MultimodalClassifier.predict_proba`): (1 - W) * fused + W * decoder."""
    return (1 - weight) * predictions["fused"] + weight * predictions["decoder"]


def average(runs: list[Path], decoder_weight: Optional[float] = None,
            threshold: Optional[float] = None) -> dict[str, float]:
    """Each run and each combination of them averaged: at 0.5, at the mean of the runs' stored thresholds (what
    predict.py does) and at ``threshold``. With ``decoder_weight`` W each run's output is (1 - W) * fused + W * decoder
    (``--combine fused_decoder --decoder-weight W``) instead of its final output; stored thresholds are then skipped."""
    loaded = {run.name: np.load(run / "val_predictions.npz") for run in runs}
    first = next(iter(loaded.values()))
    held = {run.name: held_out_rows(run) for run in runs}  # None for runs that predate the record
    reference = next((name for name, rows in held.items() if rows is not None), runs[0].name)
    for name, z in loaded.items():
        if held[name] is not None and held[name] != held[reference]:
            raise SystemExit(f"{name}: not the same validation rows as {reference}")
        if not np.array_equal(z["targets"], first["targets"]):
            raise SystemExit(f"{name}: not the same validation rows as {runs[0].name}")
        if any(np.isnan(z[k]).any() for k in ("final", "fused", "decoder") if k in z):  # unreadable images
            raise SystemExit(f"{name}: some validation rows were not predicted (unreadable images); not averaged here")
    targets = first["targets"]
    stored = {run.name: stored_thresholds(run) for run in runs}
    result: dict[str, float] = {}
    outputs = {name: z["final"] if decoder_weight is None else decoder_mixed(z, decoder_weight)
               for name, z in loaded.items()}
    for k in range(1, len(runs) + 1):
        for combo in itertools.combinations(loaded, k):
            label, mean = " + ".join(combo), np.mean([outputs[n] for n in combo], axis=0)
            result[label] = score(mean, targets)
            # predict.py's rule for an ensemble without --threshold: the mean of the members' stored thresholds.
            thresholds = mean_thresholds([stored[n] for n in combo], targets.shape[1])
            if thresholds is not None and decoder_weight is None:
                result[f"{label} at the stored thresholds ({describe_thresholds(thresholds)})"] = score(
                    mean, targets, thresholds)
            if threshold is not None:
                result[f"{label} at {threshold:g}"] = score(mean, targets, threshold)
    return result


def stored_thresholds(run: Path) -> Optional[list[float]]:
    """The thresholds a run's exported model stores (None: it stores none, 0.5)."""
    config = run / "model" / "config.json"
    return json.loads(config.read_text()).get("thresholds") if config.is_file() else None


def flip(run: Path) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    from multimodal.data import Collator, ImageCaptionDataset
    from multimodal.features import FeatureDataset, cached_features
    from multimodal.model import ImageEncoder, MultimodalClassifier
    args, frame, _, val = run_split(run)
    if not args.get("train_tail_stages") or not args.get("cache_features"):
        raise SystemExit(f"{run}: not a run on cached feature maps (--train-tail-stages with --cache-features)")
    model = MultimodalClassifier.from_pretrained(run / "model").eval()
    model.tail_stages = args["train_tail_stages"]
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


def held_out_rows(run: Path) -> Optional[list[int]]:
    """The training-CSV rows a run held out for validation, as its metrics.json records them (runs since the eighth
    session; None for earlier ones)."""
    metrics = run / "metrics.json"
    return json.loads(metrics.read_text()).get("val_source_rows") if metrics.is_file() else None


def validation_predictions(run: Path) -> Any:
    return np.load(run / "val_predictions.npz")


def run_split(run: Path) -> tuple[dict[str, Any], Any, Any, Any]:
    """The run's arguments, its training CSV (with each row's position in ``_row``) and the training and validation
    parts of its split, checked against the validation rows of its saved predictions."""
    from multimodal.annotations import read_annotations
    from multimodal.data import train_val_split
    args = json.loads((run / "run_config.json").read_text())["args"]
    frame = read_annotations(Path(args["data_dir"]) / "train.csv")
    frame["_row"] = np.arange(len(frame))
    train, val = train_val_split(frame, args["val_fraction"], args.get("split_seed", args["seed"]))
    held_out = held_out_rows(run)
    if len(val) != len(validation_predictions(run)["index"]) or (held_out is not None
                                                                 and held_out != val["_row"].tolist()):
        raise SystemExit(f"{run}: its validation rows are not the split's")
    return args, frame, train, val


def errors(run: Path) -> dict[str, float | int | str]:
    z = validation_predictions(run)
    names = json.loads((run / "model" / "config.json").read_text())["codec"]["names"]
    truth, pred = z["targets"].astype(bool), binarize(z["final"], 0.5)
    captions = [" " + re.sub(r"[^a-z0-9]+", " ", c.lower()) + " " for c in run_split(run)[3]["Caption"]]
    # Whether each caption names each class (its name or plural, as words): could the caption branch know it?
    named = np.array([[f" {n.lower()} " in cap or f" {n.lower()}s " in cap for n in names] for cap in captions])
    missed, found = truth & ~pred, truth & pred
    result = {"images predicted exactly": float((pred == truth).all(1).mean()),
              "labels missed (caption names it)": f"{int(missed.sum())} ({int((missed & named).sum())})",
              "labels found (caption names it)": f"{int(found.sum())} ({int((found & named).sum())})",
              "labels added": int((~truth & pred).sum())}
    for c, name in enumerate(names):
        result[f"{name}: missed of {int(truth[:, c].sum())} (caption names it)"] = \
            f"{int(missed[:, c].sum())} ({int((missed & named)[:, c].sum())})"
        result[f"{name}: found (caption names it)"] = f"{int(found[:, c].sum())} ({int((found & named)[:, c].sum())})"
        result[f"{name}: added"] = int((~truth[:, c] & pred[:, c]).sum())
    for threshold in (0.3, 0.35, 0.4, 0.45, 0.5):
        result[f"samples F1 at threshold {threshold}"] = score(z["final"], truth, threshold)
    return result


SINGLE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8)


def thresholds(run: Path) -> dict[str, float | str]:
    """The run's final output at 0.5, with per-class thresholds and with one threshold for every class, each tuned on
    held-out folds (what ``--tune-thresholds`` weighs, `metrics.select_thresholds`), and at each of
    ``SINGLE_THRESHOLDS`` (chosen on the scored rows: optimistic). For models whose probabilities are not centred on
    0.5 (e.g. the asymmetric loss's)."""
    from multimodal.metrics import select_thresholds
    z = validation_predictions(run)
    probs, truth = z["final"], z["targets"].astype(bool)
    _, report = select_thresholds(probs, truth)
    result = {"at 0.5": score(probs, truth),
              "per-class thresholds tuned on held-out folds": report["tuned_heldout"]["samples_f1"],
              "one threshold tuned on held-out folds": report["single_heldout"]["samples_f1"],
              "one threshold tuned on all rows": f"{report['single_threshold']:g}",
              "what --tune-thresholds would store": report["mode"]}
    for t in SINGLE_THRESHOLDS:
        result[f"at {t} (chosen on these rows: optimistic)"] = score(probs, truth, t)
    return result


def common_threshold(runs: list[Path]) -> dict[str, float | str]:
    """One threshold for every class and for several runs of a recipe on different splits: the one with the best mean
    samples F1 over the runs, each run's score at it, and each run at the threshold chosen on the others alone."""
    from multimodal.metrics import THRESHOLD_GRID
    loaded = {run.name: validation_predictions(run) for run in runs}
    table = {name: np.array([score(z["final"], z["targets"], t) for t in THRESHOLD_GRID]) for name, z in loaded.items()}
    mean = np.mean(list(table.values()), axis=0)
    best = int(np.argmax(mean))
    result: dict[str, float | str] = {"the threshold with the best mean": f"{THRESHOLD_GRID[best]:g}",
                                      "mean at it (chosen on these runs)": float(mean[best])}
    for name, row in table.items():
        result[f"{name} at 0.5"] = score(loaded[name]["final"], loaded[name]["targets"])
        result[f"{name} at {THRESHOLD_GRID[best]:g}"] = float(row[best])
    if len(runs) > 1:
        result.update(held_out(table, lambda i: f"{THRESHOLD_GRID[i]:g}", "threshold"))
    return result


def held_out(table: dict[str, np.ndarray], named: Any, what: str) -> dict[str, float]:
    """Each run of ``table`` (run -> its scores over a list of settings) at the setting with the best mean score on the
    other runs alone (``named(i)`` names setting i; ``what`` says what a setting is), and the mean of those scores."""
    result, held = {}, []
    for name in table:
        pick = int(np.argmax(np.mean([row for other, row in table.items() if other != name], axis=0)))
        held.append(float(table[name][pick]))
        result[f"{name} at {named(pick)}, chosen on the other runs"] = held[-1]
    result[f"mean, each run at the {what} chosen on the others (held out)"] = float(np.mean(held))
    return result


DECODER_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def decoder_mix(runs: list[Path]) -> dict[str, float | str]:
    """The final output that ``--combine fused_decoder --decoder-weight W`` gives, (1 - W) * fused + W * the decoder's
    scores, over W and one threshold for every class: the setting with the best mean over the runs (runs of a recipe
    on different splits), fused alone (W = 0) at its best threshold beside it, and each run at the setting chosen on
    the other runs alone."""
    from multimodal.metrics import THRESHOLD_GRID
    loaded = {run.name: validation_predictions(run) for run in runs}
    settings = [(w, t) for w in DECODER_WEIGHTS for t in THRESHOLD_GRID]
    table = {name: np.array([score(decoder_mixed(z, w), z["targets"], t) for w, t in settings])
             for name, z in loaded.items()}
    mean = np.mean(list(table.values()), axis=0)

    def named(i: int) -> str:
        return f"decoder weight {settings[i][0]:g}, threshold {settings[i][1]:g}"

    best = int(np.argmax(mean))
    alone = int(np.argmax(np.where([w == 0 for w, _ in settings], mean, -1)))
    result: dict[str, float | str] = {"the setting with the best mean": named(best),
                                      "mean at it (chosen on these runs)": float(mean[best]),
                                      f"mean of fused alone at its best ({named(alone)})": float(mean[alone])}
    for name, row in table.items():
        result[f"{name}, fused alone ({named(alone)})"] = float(row[alone])
        result[f"{name} at {named(best)}"] = float(row[best])
    if len(runs) > 1:
        result.update(held_out(table, named, "setting"))
    return result


def tfidf(run: Path) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from comp5329 import RESULTS, tfidf_logreg

    from multimodal.labels import LabelCodec
    z = validation_predictions(run)
    args, frame, train, val = run_split(run)
    codec = LabelCodec.from_labels(frame["Labels"], names=Path(args["data_dir"]) / "label_names.csv")
    row = json.loads((RESULTS / "tfidf_logreg.json").read_text())
    c = float(max(row["choice"]["C_scores"].items(), key=lambda kv: kv[1])[0])  # the row's choice of C
    probs, _ = tfidf_logreg(train, val, codec, c)
    result = {f"{run.name} fused": score(z["fused"], z["targets"]), f"TF-IDF (C={c:g})": score(probs, z["targets"])}
    for w in (0.1, 0.2, 0.3, 0.4):
        result[f"{1 - w:.1f} fused + {w:.1f} TF-IDF"] = score((1 - w) * z["fused"] + w * probs, z["targets"])
    return result


def stack(run: Path) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    z = validation_predictions(run)
    heads = [h for h in ("image", "caption", "fused", "decoder") if h in z.files]
    p = np.clip(np.stack([z[h] for h in heads], axis=-1), 1e-6, 1 - 1e-6)  # [N, C, H]
    x, y = np.log(p / (1 - p)), z["targets"]
    shared, per_class = np.zeros_like(y, dtype=np.float64), np.zeros_like(y, dtype=np.float64)
    for fit, held in KFold(2, shuffle=True, random_state=0).split(x):
        model = LogisticRegression(max_iter=1000).fit(x[fit].reshape(-1, len(heads)), y[fit].reshape(-1))
        shared[held] = model.predict_proba(x[held].reshape(-1, len(heads)))[:, 1].reshape(len(held), -1)
        for c in range(y.shape[1]):
            if len(np.unique(y[fit, c])) < 2:  # one outcome only in this half: predict its rate
                per_class[held, c] = y[fit, c].mean()
                continue
            per_class[held, c] = LogisticRegression(max_iter=1000).fit(x[fit, c], y[fit, c]).predict_proba(
                x[held, c])[:, 1]
    return {"fused head": score(z["fused"], y), f"stack of {', '.join(heads)}: one model": score(shared, y),
            f"stack of {', '.join(heads)}: one model per class": score(per_class, y)}


def unseen(run: Path) -> dict[str, float | int]:
    from multimodal.text import UNK_ID, train_caption_tokenizer
    z = validation_predictions(run)
    _, _, train, val = run_split(run)
    tokenizer = train_caption_tokenizer(train["Caption"])  # min frequency 1: only unseen words are <unk>
    has = np.array([UNK_ID in tokenizer.encode(str(c)).ids for c in val["Caption"]])[z["index"]]
    result: dict[str, float | int] = {"all validation images": score(z["final"], z["targets"])}
    for mask, name in ((has, "captions with an unseen word"), (~has, "the other captions")):
        result[f"{name} ({int(mask.sum())} images)"] = score(z["final"][mask], z["targets"][mask])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="probe", required=True)
    a = sub.add_parser("average", help="average the final probabilities of runs")
    a.add_argument("runs", nargs="+", type=Path)
    a.add_argument("--decoder-weight", type=float, default=None, metavar="W",
                   help="average (1 - W) * fused + W * decoder instead of the final output")
    a.add_argument("--threshold", type=float, default=None, help="also score at this threshold")
    c = sub.add_parser("common-threshold", help="one threshold for runs of a recipe on different splits")
    c.add_argument("runs", nargs="+", type=Path)
    d = sub.add_parser("decoder-mix", help="the fused head mixed with the decoder's scores, and one threshold, for "
                                           "runs of a recipe on different splits")
    d.add_argument("runs", nargs="+", type=Path)
    for name, text in (("flip", "test-time flip of the cached feature maps"),
                       ("errors", "missed and false labels per class; single thresholds"),
                       ("tfidf", "blend with TF-IDF + logistic regression on the same training rows"),
                       ("stack", "a cross-fitted logistic-regression stack of the run's heads"),
                       ("unseen", "on the captions with words unseen in training, and on the others"),
                       ("thresholds", "single and per-class thresholds, chosen on held-out folds")):
        sub.add_parser(name, help=text).add_argument("run", type=Path)
    args = p.parse_args()
    probes = {"flip": flip, "errors": errors, "tfidf": tfidf, "stack": stack, "unseen": unseen,
              "thresholds": thresholds}
    several = {"average": lambda runs: average(runs, args.decoder_weight, args.threshold),
               "common-threshold": common_threshold, "decoder-mix": decoder_mix}
    result = several[args.probe](args.runs) if args.probe in several else probes[args.probe](args.run)
    for name, value in result.items():
        print(f"{value if isinstance(value, (int, str)) else format(value, '.4f'):>9}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
