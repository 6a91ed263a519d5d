import numpy as np
import pytest
from sklearn.metrics import f1_score

from multimodal.metrics import (binarize, compute_metrics, describe_thresholds, mean_thresholds, samples_f1,
                                tune_thresholds)


def test_binarize_falls_back_to_the_most_probable_label():
    probs = np.array([[0.2, 0.4, 0.1], [0.9, 0.6, 0.1]])
    assert binarize(probs, 0.5).tolist() == [[False, True, False], [True, True, False]]
    assert binarize(probs, 0.5, at_least_one=False).tolist() == [[False, False, False], [True, True, False]]
    assert binarize(probs, [0.1, 0.7, 0.5]).tolist() == [[True, False, False], [True, False, False]]


def test_samples_f1_matches_scikit_learn():
    rng = np.random.default_rng(0)
    pred = rng.random((50, 6)) > 0.6
    targets = rng.random((50, 6)) > 0.5
    ours = samples_f1(pred, targets).mean()
    assert ours == pytest.approx(f1_score(targets, pred, average="samples", zero_division=0))


def test_compute_metrics_on_a_known_case():
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    probs = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.4, 0.7, 0.1]])
    m = compute_metrics(probs, targets)
    # predictions {0}, {0}, {1}: per-image F1 1, 2/3, 1
    assert m["samples_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert np.isnan(m["per_class_ap"][2]) and m["map"] == pytest.approx(np.mean(m["per_class_ap"][:2]))
    assert len(m["per_class_f1"]) == 3


def test_a_class_neither_present_nor_predicted_is_left_out_of_macro_f1() -> None:
    """Perfect predictions where class 2 never occurs: macro F1 1 (it was 2/3: scikit-learn's default counts the class
    as 0), as mAP leaves the class out; a class predicted but absent still counts as 0."""
    targets = np.array([[1, 0, 0], [0, 1, 0]])
    m = compute_metrics(np.array([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1]]), targets)
    assert m["macro_f1"] == 1.0 and m["per_class_f1"][:2] == [1.0, 1.0] and np.isnan(m["per_class_f1"][2])
    m = compute_metrics(np.array([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1]]), targets)
    assert m["per_class_f1"] == [1.0, 1.0, 0.0] and m["macro_f1"] == pytest.approx(2 / 3)


def test_tuned_thresholds_help_a_miscalibrated_class():
    rng = np.random.default_rng(1)
    targets = rng.random((400, 3)) > 0.5
    probs = np.where(targets, 0.7, 0.3) + rng.normal(0, 0.05, targets.shape)
    probs[:, 2] = np.where(targets[:, 2], 0.35, 0.15)  # class 2 never clears 0.5
    before = compute_metrics(probs, targets)["samples_f1"]
    thresholds = tune_thresholds(probs, targets)
    after = compute_metrics(probs, targets, thresholds)["samples_f1"]
    assert 0.15 < thresholds[2] <= 0.35
    assert after > before + 0.05


def test_crossfit_tuning_is_not_optimistic_on_noise():
    rng = np.random.default_rng(2)
    targets = rng.random((600, 4)) > 0.5
    probs = rng.random((600, 4))  # no signal at all
    from multimodal.metrics import crossfit_tuned_metrics
    in_sample = compute_metrics(probs, targets, tune_thresholds(probs, targets))["samples_f1"]
    crossfit = crossfit_tuned_metrics(probs, targets)["samples_f1"]
    assert crossfit < in_sample  # tuning on the scored rows overfits the noise; held-out tuning does not


def test_select_thresholds_keeps_tuning_only_when_it_pays_held_out():
    from multimodal.metrics import select_thresholds
    rng = np.random.default_rng(3)
    targets = rng.random((400, 3)) > 0.5
    probs = np.where(targets, 0.7, 0.3) + rng.normal(0, 0.05, targets.shape)
    probs[:, 2] = np.where(targets[:, 2], 0.35, 0.15)  # class 2 never clears 0.5: tuning must pay
    thresholds, report = select_thresholds(probs, targets)
    assert report["kept"] and report["tuned_heldout"]["samples_f1"] > report["at_0_5"] + 0.05
    assert thresholds is not None and 0.15 < thresholds[2] <= 0.35

    targets[~targets.any(axis=1), 0] = True  # every image has a label, as in the data
    separable = np.where(targets, 0.9, 0.1)  # perfect at 0.5: nothing to gain, so nothing is stored
    thresholds, report = select_thresholds(separable, targets)
    assert report["at_0_5"] == 1.0 and not report["kept"] and thresholds is None and report["mode"] == "0.5"


def test_select_thresholds_takes_one_threshold_for_all_classes_when_the_probabilities_run_high():
    """A model whose probabilities are all shifted up (as the asymmetric loss's are): one threshold for every class
    recovers what 0.5 loses, held out, and is stored for every class."""
    from multimodal.metrics import select_thresholds
    rng = np.random.default_rng(4)
    targets = rng.random((400, 4)) > 0.6
    targets[~targets.any(axis=1), 0] = True
    probs = np.clip(np.where(targets, 0.85, 0.62) + rng.normal(0, 0.04, targets.shape), 0, 1)
    thresholds, report = select_thresholds(probs, targets)
    assert report["mode"] == "single" and report["kept"]
    assert 0.65 <= report["single_threshold"] <= 0.8 and thresholds.tolist() == [report["single_threshold"]] * 4
    assert report["single_heldout"]["samples_f1"] > report["at_0_5"] + 0.2
    assert report["single_heldout"]["samples_f1"] >= report["tuned_heldout"]["samples_f1"]


def test_scores_of_predictions_leave_out_the_rows_that_could_not_be_predicted() -> None:
    from multimodal.inference import score_predictions
    from multimodal.labels import LabelCodec
    codec = LabelCodec.from_labels([(1,), (2,), (1, 3)])
    probs = np.array([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.1]], dtype=np.float32)
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=np.float32)  # the third row would score 0
    result = {"probabilities": probs, "usable": np.array([True, True, False]), "thresholds": 0.5}
    scores = score_predictions(result, targets, codec)
    assert scores["rows_scored"] == 2 and scores["rows_not_predicted"] == 1
    assert scores["samples_f1"] == 1.0 and scores["thresholds"] == [0.5, 0.5, 0.5]
    assert [c["support"] for c in scores["per_class"].values()] == [1, 1, 0]
    assert scores["per_class"]["3"]["ap"] is None  # no positive among the scored rows: no AP (JSON null, not NaN)
    assert scores["per_class"]["3"]["f1"] is None and scores["macro_f1"] == 1.0  # nor F1: it is never predicted
    result["usable"] = np.zeros(3, dtype=bool)
    assert score_predictions(result, targets, codec) == {"rows_scored": 0, "rows_not_predicted": 3}


def test_an_ensemble_thresholds_at_the_mean_of_its_members_stored_thresholds(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="multimodal")
    assert mean_thresholds([None, None], 3) is None  # 0.5 for all, as before
    assert describe_thresholds(None) == "0.5"
    assert describe_thresholds(float("inf")) == "inf"  # it said "inf..inf per class"
    # Members of one recipe (the asymmetric loss stores about 0.7): their thresholds' mean, no warning.
    same = mean_thresholds([[0.7, 0.7, 0.7], [0.65, 0.75, 0.7]], 3)
    np.testing.assert_allclose(same, [0.675, 0.725, 0.7])
    assert describe_thresholds(same) == "0.675..0.725 per class"
    assert describe_thresholds(mean_thresholds([0.7, [0.7] * 3], 3)) == "0.7"  # a scalar counts for every class
    assert not caplog.records
    # A member that stores none counts as 0.5; thresholds more than 0.1 apart are warned about.
    np.testing.assert_allclose(mean_thresholds([[0.7, 0.3, 0.55], None], 3), [0.6, 0.4, 0.525])
    assert len(caplog.records) == 1 and "up to 0.20 apart" in caplog.records[0].getMessage()


def test_an_ensemble_of_models_with_other_labels_is_refused_before_its_thresholds_are_averaged() -> None:
    """Models of 15 and 3 classes, one storing thresholds: the thresholds' mean failed with numpy's broadcast error
    instead of saying why."""
    from types import SimpleNamespace

    from multimodal.config import UsageError
    from multimodal.inference import ensemble_thresholds
    from multimodal.labels import LabelCodec

    many = SimpleNamespace(codec=LabelCodec.from_labels([tuple(range(1, 16))]), thresholds=None)
    few = SimpleNamespace(codec=LabelCodec.from_labels([(1, 3, 8)]), thresholds=[0.3] * 3)
    with pytest.raises(UsageError, match=r"must predict the same labels: \[1, 2, .*, 15\] vs \[1, 3, 8\]"):
        ensemble_thresholds([many, few])
    assert ensemble_thresholds([few, few]) == [0.3] * 3
