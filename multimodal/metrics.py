"""Multi-label metrics (scikit-learn) and the decision rule that turns probabilities into label sets.

The competition metric is the samples-averaged F1: the mean over images of each image's F1. Every image carries at
least one label, so the decision rule falls back to the single most probable label when no probability clears its
threshold (``at_least_one``); an empty prediction would score 0 for that image.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, f1_score

logger = logging.getLogger("multimodal")


def binarize(probs: np.ndarray, thresholds: float | Sequence[float] | np.ndarray = 0.5,
             at_least_one: bool = True) -> np.ndarray:
    """Label sets from probabilities.

    Args:
        probs: [N, C] probabilities.
        thresholds: one threshold for all classes or one per class.
        at_least_one: predict the most probable label for rows where none clears its threshold.

    Returns:
        [N, C] boolean predictions.
    """
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs >= np.asarray(thresholds, dtype=np.float64)
    if at_least_one and len(probs):
        empty = ~pred.any(axis=1)
        pred[empty, probs[empty].argmax(axis=1)] = True
    return pred


def check_thresholds(thresholds: Any, num_labels: int) -> np.ndarray:
    """``thresholds`` (one number, or one per class; a list of one is one for every class; a tensor too) as a float64
    array, after checking them: numbers, none NaN or negative.

    Raises:
        ValueError: naming what is wrong (predict.py refuses the same values of its --threshold).
    """
    try:
        values = np.asarray(thresholds.detach().cpu() if hasattr(thresholds, "detach") else thresholds,
                            dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be a number or {num_labels} numbers, one per class; got "
                         f"{thresholds!r}") from None
    if isinstance(thresholds, (str, bytes)) or values.ndim > 1 or (values.ndim == 1 and values.size not in
                                                                      (1, num_labels)):
        raise ValueError(f"thresholds must be a number or {num_labels} numbers, one per class (in codec.label_ids "
                         f"order); got {thresholds!r}")
    if not (values >= 0).all():  # NaN too
        raise ValueError(f"thresholds must be at least 0 (and not NaN); got {thresholds!r}")
    return values


def samples_f1(pred: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-image F1 ([N] floats); 0 where both prediction and truth are empty is scored 0 like scikit-learn."""
    pred = np.asarray(pred, dtype=bool)
    targets = np.asarray(targets, dtype=bool)
    tp = (pred & targets).sum(axis=1)
    denom = pred.sum(axis=1) + targets.sum(axis=1)
    return np.divide(2.0 * tp, denom, out=np.zeros(len(pred)), where=denom > 0)


def compute_metrics(probs: np.ndarray, targets: np.ndarray,
                    thresholds: float | Sequence[float] | np.ndarray = 0.5,
                    at_least_one: bool = True) -> dict[str, Any]:
    """Samples/micro/macro F1, mAP and per-class F1 and AP.

    Args:
        probs: [N, C] probabilities.
        targets: [N, C] multi-hot truth.
        thresholds: scalar or [C] thresholds.
        at_least_one: see `binarize`.

    Returns:
        Scalars ``samples_f1``, ``micro_f1``, ``macro_f1``, ``map`` and lists ``per_class_f1``, ``per_class_ap``
        (``nan`` AP for a class without positives; mAP averages the classes that have positives). A class neither
        present nor predicted has no F1 (``nan``, where scikit-learn's default says 0): macro F1 averages the other
        classes, as mAP does, so a class missing from a small validation split does not count as wrong.
    """
    targets = np.asarray(targets).astype(bool)
    pred = binarize(probs, thresholds, at_least_one)
    per_class_ap = []
    for c in range(targets.shape[1]):
        if targets[:, c].any():
            per_class_ap.append(float(average_precision_score(targets[:, c], probs[:, c])))
        else:
            per_class_ap.append(float("nan"))
    return {
        "samples_f1": float(f1_score(targets, pred, average="samples", zero_division=0)),
        "micro_f1": float(f1_score(targets, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(targets, pred, average="macro", zero_division=np.nan)),
        "map": float(np.nanmean(per_class_ap)) if not np.all(np.isnan(per_class_ap)) else float("nan"),
        "per_class_f1": [float(v) for v in f1_score(targets, pred, average=None, zero_division=np.nan)],
        "per_class_ap": per_class_ap,
    }


ENSEMBLE_THRESHOLD_SPREAD = 0.1  # members' stored thresholds further apart than this on a class: warned about


def mean_thresholds(stored: Sequence[Optional[Sequence[float] | float]], num_labels: int) -> Optional[list[float]]:
    """The thresholds for an ensemble's mean probabilities: per class, the mean of the thresholds its members store
    (0.5 for a member that stores none); None (0.5 for every class) if no member stores any.

    Members of one recipe store similar thresholds, and their mean probability runs as high as theirs: members trained
    with the asymmetric loss, whose probabilities run high, each store about 0.7, and so must their mean (0.5 would
    lose about 0.045 samples F1: `benchmarks/EXPLORATION.md`, twelfth session). Where the members' thresholds differ
    (models of different recipes) their mean is only a guess, and a warning says so: a threshold chosen for the
    ensemble itself on labelled data is better.
    """
    if all(t is None for t in stored):
        return None
    values = np.stack([np.broadcast_to(np.asarray(0.5 if t is None else t, dtype=np.float64), (num_labels,))
                       for t in stored])
    spread = float((values.max(0) - values.min(0)).max())
    if spread > ENSEMBLE_THRESHOLD_SPREAD:
        logger.warning("the %d models store thresholds up to %.2f apart on a class (0.5 where a model stores none): "
                       "the ensemble uses their mean, a guess; give a threshold chosen for the ensemble on labelled "
                       "data instead", len(stored), spread)
    return values.mean(0).tolist()


def describe_thresholds(thresholds: Any) -> str:
    """``0.7`` for one threshold (or the same for every class), ``0.35..0.8 per class`` otherwise."""
    values = np.atleast_1d(np.asarray(0.5 if thresholds is None else thresholds, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    return f"{low:g}" if low == high or high - low < 1e-9 else f"{low:g}..{high:g} per class"  # inf - inf is NaN


THRESHOLD_GRID = np.linspace(0.05, 0.95, 19)  # the thresholds that tuning tries, per class or for all


def tune_thresholds(probs: np.ndarray, targets: np.ndarray,
                    grid: Sequence[float] | np.ndarray | None = None, rounds: int = 2,
                    at_least_one: bool = True) -> np.ndarray:
    """Per-class thresholds that maximise samples-F1 on held-out data, by coordinate ascent from 0.5.

    Samples-F1 couples the classes (an image's score depends on all its labels), so each class's threshold is chosen
    with the others fixed, for ``rounds`` sweeps. A class keeps its threshold unless a grid value strictly improves.

    Returns:
        [C] float thresholds.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    grid = THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    thresholds = np.full(probs.shape[1], 0.5)
    best = samples_f1(binarize(probs, thresholds, at_least_one), targets).mean()
    for _ in range(rounds):
        for c in range(probs.shape[1]):
            for value in grid:
                trial = thresholds.copy()
                trial[c] = value
                score = samples_f1(binarize(probs, trial, at_least_one), targets).mean()
                if score > best + 1e-12:
                    best, thresholds = score, trial
    return thresholds


def tune_single_threshold(probs: np.ndarray, targets: np.ndarray, grid: Sequence[float] | np.ndarray | None = None,
                          at_least_one: bool = True) -> float:
    """The one threshold for every class that maximises samples-F1 (the grid value nearest 0.5 among ties): for a
    model whose probabilities are not centred on 0.5 as a whole, e.g. one trained with the asymmetric loss."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    grid = THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    scores = [(samples_f1(binarize(probs, t, at_least_one), targets).mean(), -abs(t - 0.5), t) for t in grid]
    return float(max(scores)[2])


def crossfit_tuned_metrics(probs: np.ndarray, targets: np.ndarray, folds: int = 2, seed: int = 0,
                           at_least_one: bool = True, per_class: bool = True) -> dict[str, Any]:
    """Metrics with thresholds tuned on held-out folds: an honest estimate of what tuning gains.

    Tuning thresholds on the validation split and scoring on that same split is optimistic. Here the rows are split
    into ``folds`` parts; each part is predicted with thresholds tuned on the other parts (one per class, or with
    ``per_class=False`` one for all classes), and the metrics are taken over all rows.
    """
    probs = np.asarray(probs, dtype=np.float64)
    fold_of = np.random.default_rng(seed).permutation(len(probs)) % folds
    pred = np.zeros(probs.shape, dtype=bool)
    tune = tune_thresholds if per_class else tune_single_threshold
    for k in range(folds):
        thresholds = tune(probs[fold_of != k], targets[fold_of != k], at_least_one=at_least_one)
        pred[fold_of == k] = binarize(probs[fold_of == k], thresholds, at_least_one)
    # compute_metrics on 0/1 "probabilities" at threshold 0.5 scores exactly these predictions (AP is left as is).
    result = compute_metrics(pred.astype(np.float64), targets, 0.5, at_least_one=False)
    result["map"] = compute_metrics(probs, targets)["map"]
    return result


def select_thresholds(probs: np.ndarray, targets: np.ndarray, folds: int = 2, seed: int = 0,
                      at_least_one: bool = True) -> tuple[Optional[np.ndarray], dict[str, Any]]:
    """Thresholds tuned on all of ``probs``: one per class, or one for every class, or none (0.5), whichever scores
    best on held-out rows.

    Tuning can lose: for a well-calibrated model, per-class thresholds fitted on one split partly fit its noise. The
    held-out estimates (`crossfit_tuned_metrics`, per class and single) decide: tuned thresholds are returned only
    when their cross-fitted samples-F1 beats 0.5 on the same rows; otherwise ``None`` (predict at 0.5). Ties go to
    the simpler rule (0.5, then one threshold).

    Returns:
        ``(thresholds [C] or None, report)``; ``report`` has the metrics ``tuned`` (per class, in-sample:
        optimistic), ``tuned_heldout`` (per class, cross-fitted), ``single_threshold`` (tuned on all rows) and
        ``single_heldout`` (cross-fitted), the samples-F1 ``at_0_5``, ``mode`` ("0.5", "single" or "per_class") and
        ``kept`` (whether thresholds are returned).
    """
    tuned = tune_thresholds(probs, targets, at_least_one=at_least_one)
    heldout = crossfit_tuned_metrics(probs, targets, folds, seed, at_least_one)
    single = tune_single_threshold(probs, targets, at_least_one=at_least_one)
    single_heldout = crossfit_tuned_metrics(probs, targets, folds, seed, at_least_one, per_class=False)
    at_half = compute_metrics(probs, targets, 0.5, at_least_one)["samples_f1"]
    candidates = [(at_half, 2, "0.5"), (single_heldout["samples_f1"], 1, "single"), (heldout["samples_f1"], 0,
                                                                                       "per_class")]
    mode = max(candidates)[2]  # the best held-out score; among ties the simplest rule
    report = {"tuned": compute_metrics(probs, targets, tuned, at_least_one), "tuned_heldout": heldout,
              "single_threshold": single, "single_heldout": single_heldout, "at_0_5": at_half, "mode": mode,
              "kept": mode != "0.5"}
    thresholds = {"0.5": None, "single": np.full(probs.shape[1], single), "per_class": tuned}[mode]
    return thresholds, report
