"""`LabelCodec`: class order, encoding, decoding, decoder sequences and persistence."""
from __future__ import annotations

import json

import numpy as np
import pytest

from multimodal.annotations import AnnotationError, read_annotations
from multimodal.labels import LabelCodec, UnknownLabelError, load_names

LABELS = [(1,), (1, 19), (8, 3, 13), (3, 1), (19,), (13, 13)]


@pytest.fixture()
def codec() -> LabelCodec:
    return LabelCodec.from_labels(LABELS)


def test_classes_are_sorted_ids_with_frequencies(codec):
    assert codec.label_ids == (1, 3, 8, 13, 19)
    assert codec.frequencies == (3, 2, 1, 2, 2)  # a repeated id counts once per image
    assert codec.num_labels == len(codec) == 5
    assert (codec.end_index, codec.start_index) == (5, 6)
    assert codec.names == ("1", "3", "8", "13", "19")


def test_encode_multi_hot(codec):
    target = codec.encode((19, 1))
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target, [1, 0, 0, 0, 1])
    np.testing.assert_array_equal(codec.encode(()), np.zeros(5))


def test_unknown_label_is_key_and_value_error(codec):
    with pytest.raises(ValueError, match="unknown label id 12"):
        codec.encode((1, 12))
    with pytest.raises(KeyError):
        codec.index(12)
    assert issubclass(UnknownLabelError, KeyError) and issubclass(UnknownLabelError, ValueError)


def test_decode_scalar_and_per_class_thresholds(codec):
    probs = np.array([0.9, 0.5, 0.49, 0.2, 0.7])
    assert codec.decode(probs, 0.5) == (1, 3, 19)
    assert codec.decode(probs, [0.95, 0.6, 0.4, 0.1, 0.7]) == (8, 13, 19)
    assert codec.decode(np.zeros(5), 0.5) == ()
    assert codec.decode(probs, None) == (1, 3, 19)  # a model that stores no thresholds predicts at 0.5
    with pytest.raises(ValueError, match="shape"):
        codec.decode(np.zeros(4), 0.5)


def test_sequence_is_frequent_first_ties_by_index(codec):
    # frequencies by index: 1->3, 3->2, 8->1, 13->2, 19->2
    assert codec.sequence((19, 8, 13, 3, 1)) == [0, 1, 3, 4, 2]
    assert codec.sequence((19, 13, 13)) == [3, 4]
    assert codec.sequence(()) == []


def test_json_round_trip(codec, tmp_path):
    named = LabelCodec(codec.label_ids, names={1: "person", 19: "horse"}, frequencies=codec.frequencies)
    path = tmp_path / "sub" / "labels.json"
    named.save(path)
    data = json.loads(path.read_text())
    assert data["label_ids"] == [1, 3, 8, 13, 19] and data["names"][0] == "person"
    loaded = LabelCodec.load(path)
    assert loaded == named and loaded.names == ("person", "3", "8", "13", "horse")
    assert loaded.sequence((19, 8, 1)) == named.sequence((19, 8, 1))
    assert LabelCodec.from_dict(named.to_dict()) == named


def test_names_from_csv(tmp_path):
    path = tmp_path / "names.csv"
    path.write_text("label,name\n1,person\n3,car\n")
    assert load_names(path) == {1: "person", 3: "car"} == LabelCodec.load_names(path)
    assert LabelCodec.from_labels([(1,), (3,)], names=path).names == ("person", "car")
    path.write_text("label,name\none,person\n")
    with pytest.raises(ValueError, match="line 2"):
        load_names(path)
    path.write_text("label,name\n0,red\n25\n")  # an AttributeError traceback
    with pytest.raises(AnnotationError, match="names.csv, line 3: label 25 has no name"):
        load_names(path)
    path.write_bytes(b"label,name\n1,\xff\xfe\n")  # a binary file: a UnicodeDecodeError traceback
    with pytest.raises(AnnotationError, match="names.csv: not UTF-8 text"):
        load_names(path)


@pytest.mark.comp5329
def test_real_codec(comp5329_dir):
    frame = read_annotations(comp5329_dir / "train.csv")
    codec = LabelCodec.from_labels(frame["Labels"], names=comp5329_dir / "label_names.csv")
    assert codec.num_labels == 18 and 12 not in codec.label_ids
    assert codec.label_ids == tuple(i for i in range(1, 20) if i != 12)
    assert codec.names[0] == "person" and codec.names[codec.index(13)] == "stop sign"
    assert codec.frequencies[0] == 12155 and sum(codec.frequencies) == sum(len(set(x)) for x in frame["Labels"])
    assert codec.sequence((19, 1)) == [0, codec.index(19)]  # person (the most frequent) first
