"""`read_annotations`: exact loading of the quirky real files and clear errors on bad ones."""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from multimodal.annotations import AnnotationError, read_annotations


def write(tmp_path: Path, text: str, name: str = "train.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


# ----------------------------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def train(comp5329_dir):
    return read_annotations(comp5329_dir / "train.csv")


@pytest.mark.comp5329
def test_real_train_has_every_row(train):
    assert len(train) == 16000
    assert list(train.columns) == ["ImageID", "Labels", "Caption"]
    assert train.index.equals(pd.RangeIndex(16000))
    assert list(train["ImageID"]) == [f"{i}.jpg" for i in range(16000)]
    assert all(type(labels) is tuple and labels and all(type(x) is int for x in labels) for labels in train["Labels"])
    assert all(isinstance(caption, str) for caption in train["Caption"])


@pytest.mark.comp5329
def test_real_train_label_counts_match_csv_module(train, comp5329_dir):
    # Independent parse: the csv module's state machine keeps the labels column intact even where captions are mangled.
    with open(comp5329_dir / "train.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [row[0] for row in rows] == list(train["ImageID"])
    expected = Counter(int(x) for row in rows for x in row[1].split())
    assert Counter(x for labels in train["Labels"] for x in labels) == expected
    assert [tuple(int(x) for x in row[1].split()) for row in rows] == list(train["Labels"])
    assert expected[1] == 12155 and 12 not in expected and len(expected) == 18


@pytest.mark.comp5329
def test_real_train_single_line_captions_match_raw_lines(train, comp5329_dir):
    raw = (comp5329_dir / "train.csv").read_text().split("\n")
    single = [re.fullmatch(r'(\d+)\.jpg,[\d ]+,"(.*)"', line) for line in raw[1:]]
    captions = {int(m[1]): m[2] for m in single if m}
    assert len(captions) == 16000 - 3  # three captions span two lines
    assert all(train.at[i, "Caption"] == caption for i, caption in captions.items())


@pytest.mark.comp5329
def test_real_train_exact_rows(train):
    def row(i):
        return train.at[i, "ImageID"], train.at[i, "Labels"], train.at[i, "Caption"]

    assert row(0) == ("0.jpg", (1,), "Woman in swim suit holding parasol on sunny day.")
    assert row(3) == ("3.jpg", (8, 3, 13), "a black and silver clock tower at an intersection near a tree")
    # Unescaped inner quotes, including a caption that ends in one and a comma inside them.
    assert row(1338) == ("1338.jpg", (1,), 'A man surfing with titling that reads "spray."')
    assert row(9084)[2] == (
        'A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground and a street stretching into '
        "the background."
    )
    assert row(10313)[2] == 'A large sign in a green grass covered field that reads"No Thru Traffic".'
    # Line breaks inside captions.
    assert row(1014) == (
        "1014.jpg",
        (18,),
        "Atop an oriental rug rests a dog and two low-lying tables and a taller one\n"
        "full of very tidily arranged piles of jeans and tops.",
    )
    assert row(2259) == ("2259.jpg", (1, 3), "Men loading up a van with bags and suitcases.\n.")
    assert row(6751) == ("6751.jpg", (4,), "Red motor \nscooter parked on the sand with a sunset in background.")


@pytest.mark.comp5329
def test_real_test_file(comp5329_dir):
    test = read_annotations(comp5329_dir / "test.csv")
    assert list(test.columns) == ["ImageID", "Caption"]
    assert list(test["ImageID"]) == [f"{i}.jpg" for i in range(30000, 31000)]
    assert test.at[0, "Caption"] == "A little girl waring a krispy kreme hat holding a box of krispy kreme donuts."
    assert test.at[128, "Caption"] == 'A picture of a very old man with the name " Scott " written under it.'
    raw = (comp5329_dir / "test.csv").read_text().splitlines()[1:]
    assert list(test["Caption"]) == [re.fullmatch(r'\d+\.jpg,"(.*)"', line)[1] for line in raw]


# ----------------------------------------------------------------------------------------------- synthetic quirks


def test_quirks_crlf_multiline_quotes_and_empty_captions(tmp_path):
    path = write(
        tmp_path,
        "ImageID,Labels,Caption\r\n"
        '0.jpg,1 2,"A sign reading "stop, now"."\r\n'
        '1.jpg,3,"two\r\n\r\nlines"\r\n'
        "2.jpg,4,\r\n"
        '3.jpg,5,""\r\n'
        "4.jpg,6,unquoted, with comma\r\n\r\n",
    )
    frame = read_annotations(path)
    assert list(frame["ImageID"]) == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    assert list(frame["Labels"]) == [(1, 2), (3,), (4,), (5,), (6,)]
    assert list(frame["Caption"]) == ['A sign reading "stop, now".', "two\n\nlines", "", "", "unquoted, with comma"]


def test_properly_escaped_csv_round_trips(tmp_path):
    captions = ['He said "hi", then left.', "line\nbreak", "plain"]
    path = tmp_path / "written.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageID", "Labels", "Caption"])
        writer.writerows([f"{i}.jpg", "1 2", caption] for i, caption in enumerate(captions))
    assert list(read_annotations(path)["Caption"]) == captions


def test_quoted_image_ids_may_hold_spaces(tmp_path):
    frame = read_annotations(write(tmp_path, 'ImageID,Labels,Caption\n"my photo.JPG",1 2,"a, b"\n"x.jfif",3,c\n'))
    assert list(frame["ImageID"]) == ["my photo.JPG", "x.jfif"] and list(frame["Caption"]) == ["a, b", "c"]


def test_header_only_gives_empty_frame(tmp_path):
    frame = read_annotations(write(tmp_path, "ImageID,Caption\n"))
    assert len(frame) == 0 and list(frame.columns) == ["ImageID", "Caption"]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("ImageID,Labels\n0.jpg,1\n", 1, "missing required column(s) ['Caption']"),
        ("Image,Labels,Caption\n0.jpg,1,a\n", 1, "missing required column(s) ['ImageID']"),
        ("ImageID,Caption,Labels\n0.jpg,a,1\n", 1, "unsupported header"),
        ("", 1, "empty file"),
        ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,1 x,"b"\n', 3, "label 'x' is not a non-negative integer"),
        ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,-2,"b"\n', 3, "label '-2'"),
        ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,,"b"\n', 3, "empty label list"),
        ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,2,"b"\n0.jpg,3,"c"\n', 4, "duplicate ImageID '0.jpg' (first on"),
        ("ImageID,Labels,Caption\n0.jpg,1,a\nstray text\n", 3, "malformed row"),
        ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg\n', 3, "no fields after the ImageID"),
        ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,2\n', 3, "expected ImageID,Labels,Caption"),
        ('ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,2,"open\nnever closed\n', 3, "unterminated quoted caption"),
        ("ImageID,Caption\nphoto,a caption\n", 2, "malformed row (a row starts with its ImageID, an image file name "
         "ending in .jpg, .jpeg,"),
        ("ImageID,Caption\nmy photo.jpg,a caption\n", 2, "without spaces or commas unless quoted, then a comma"),
        ("ImageID\tLabels\tCaption\n0.jpg\t1\ta\n", 1, "its columns seem separated by tabs: the file must be "
         "comma-separated"),
        # a quoted labels field with a comma was read as its first label, the rest becoming the caption
        ('ImageID,Labels,Caption\n0.jpg,"1 3",a\n1.jpg,"1,3",b\n', 3,
         'label \'1,3\' is not a non-negative integer (labels are separated by spaces: "1 3")'),
    ],
)
def test_errors_name_file_and_line(tmp_path, text, line, fragment):
    path = write(tmp_path, text)
    with pytest.raises(AnnotationError) as info:
        read_annotations(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line}: ")
    assert fragment in message
    assert info.value.line == line and isinstance(info.value, ValueError)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("ImageID,Labels,Caption\n0.jpg,1,a cafe\n1.jpg,2,a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(AnnotationError, match=rf"^{path}, line 3: not UTF-8 text \(byte b'\\xe9' at offset \d+\): "
                                              "save the file as UTF-8"):
        read_annotations(path)
    assert read_annotations(write(tmp_path, 'ImageID,Labels,Caption\n0.jpg,"1 3",a\n'))["Labels"][0] == (1, 3)
