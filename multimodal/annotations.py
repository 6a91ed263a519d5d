"""Reading COMP5329-style annotation files.

The files look like CSV (``ImageID,Labels,Caption`` for training, ``ImageID,Caption`` for test) but are not valid CSV:
captions are wrapped in quotes without escaping the quotes inside them, and a few captions hold line breaks. A CSV
parser therefore drops or merges rows. This reader is line-oriented instead: a record starts at a line that begins with
an image file name followed by a comma, and its caption runs up to the next record start, outer quotes stripped.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pandas as pd

__all__ = ["AnnotationError", "read_annotations", "TRAIN_COLUMNS", "TEST_COLUMNS"]

TRAIN_COLUMNS = ("ImageID", "Labels", "Caption")
TEST_COLUMNS = ("ImageID", "Caption")
_REQUIRED = ("ImageID", "Caption")

# An image file name (no white space, quotes or commas; optionally quoted) at the start of a line, followed by a comma
# or the end of the line. The latter never makes a valid row, but recognising it reports the bad line itself instead
# of merging it into the previous caption.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "bmp", "gif", "webp", "tif", "tiff")
# A record starts with its ImageID: an image file name, bare (no spaces, commas or quotes) or quoted (spaces allowed).
_EXTENSION = "(?:" + "|".join(IMAGE_EXTENSIONS) + ")"
_RECORD_START = re.compile(
    rf'^(?:"(?P<quoted>[^",\n]*?[^",\s]\.{_EXTENSION})"|(?P<bare>[^",\s]+\.{_EXTENSION}))(?:,|\s*$)', re.IGNORECASE
)
_ROW_RULE = (f"a row starts with its ImageID, an image file name ending in .{', .'.join(IMAGE_EXTENSIONS)}, "
             "without spaces or commas unless quoted, then a comma")
# The labels field, bare or quoted; a quoted one may hold a comma ("1,3"), which `_parse_labels` then refuses.
_LABELS_FIELD = re.compile(r'^(?:"(?P<quoted>[^"]*)"|(?P<labels>[^,"]*)),')
_INTEGER = re.compile(r"^[0-9]+$")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the 1-based line number."""

    def __init__(self, path: str | Path, line: Optional[int], message: str) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")


def read_annotations(path: str | Path) -> pd.DataFrame:
    """Read a COMP5329 annotation file, keeping every row exactly.

    Captions are taken verbatim between their outer quotes, so quotes and line breaks inside them survive. A caption
    whose inner quotes all come in ``""`` pairs is taken to be properly CSV-escaped (a file written by pandas or the
    ``csv`` module) and is unescaped. A caption line break followed by an image name and a comma cannot be told apart
    from a new row; the cut caption is then left without its closing quote and reported.

    Args:
        path: CSV with header ``ImageID,Labels,Caption`` (training) or ``ImageID,Caption`` (test).

    Returns:
        DataFrame in file order with a RangeIndex and columns ``ImageID`` (str), ``Labels`` (tuple of int, non-empty;
        training files only) and ``Caption`` (str, may be empty).

    Raises:
        AnnotationError: naming the file and line, for a missing or unsupported header, a row that does not start with
            an image name, a missing labels field, a label that is not an integer, an empty label list, an unterminated
            quoted caption or a duplicate ``ImageID``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # universal newlines: "\r\n" is already "\n"
    except UnicodeDecodeError as error:
        raw = path.read_bytes()
        raise AnnotationError(path, raw[:error.start].count(b"\n") + 1,
                              f"not UTF-8 text (byte {raw[error.start:error.start + 1]!r} at offset {error.start}): "
                              "save the file as UTF-8") from None
    has_labels = _read_header(path, lines[0])

    # Group physical lines into records: (first line number, lines).
    records: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines[1:], start=2):
        if _RECORD_START.match(line):
            records.append((number, [line]))
        elif records and _continues(records[-1][1][0], has_labels):
            records[-1][1].append(line)
        elif line.strip():
            raise AnnotationError(path, number, f"malformed row ({_ROW_RULE}): {line[:80]!r}")

    columns: dict[str, list] = {"ImageID": [], "Labels": [], "Caption": []}
    first_line: dict[str, int] = {}
    for number, parts in records:
        while len(parts) > 1 and not parts[-1].strip():  # blank lines after the record, not part of it
            parts.pop()
        text = "\n".join(parts)
        match = _RECORD_START.match(text)
        image_id, rest = match["quoted"] or match["bare"], text[match.end():]
        if not text[: match.end()].endswith(","):
            raise AnnotationError(path, number, f"malformed row {image_id!r}: no fields after the ImageID")
        if image_id in first_line:
            first = first_line[image_id]
            raise AnnotationError(path, number, f"duplicate ImageID {image_id!r} (first on line {first})")
        first_line[image_id] = number
        if has_labels:
            field = _LABELS_FIELD.match(rest)
            if field is None:
                raise AnnotationError(path, number, f"malformed row {image_id!r}: expected ImageID,Labels,Caption")
            labels = field["quoted"] if field["quoted"] is not None else field["labels"]
            columns["Labels"].append(_parse_labels(path, number, labels))
            rest = rest[field.end():]
        columns["ImageID"].append(image_id)
        columns["Caption"].append(_parse_caption(path, number, rest))

    frame = pd.DataFrame({"ImageID": columns["ImageID"], "Caption": columns["Caption"]})
    if has_labels:
        frame.insert(1, "Labels", pd.Series(columns["Labels"], dtype=object))
    return frame


def _read_header(path: Path, header: str) -> bool:
    """Validate the header line; returns whether the file has a ``Labels`` column."""
    names = tuple(name.strip().strip('"') for name in header.split(","))
    expected = f"{','.join(TRAIN_COLUMNS)} or {','.join(TEST_COLUMNS)}"
    if names == ("",):
        raise AnnotationError(path, 1, f"empty file, expected a header {expected}")
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        separator = next((name for sep, name in (("\t", "tabs"), (";", "semicolons")) if sep in header), None)
        raise AnnotationError(path, 1, f"missing required column(s) {missing} in header {header.strip()!r}"
                              + (f" (its columns seem separated by {separator}: the file must be comma-separated)"
                                 if separator else ""))
    if names not in (TRAIN_COLUMNS, TEST_COLUMNS):
        raise AnnotationError(path, 1, f"unsupported header {header.strip()!r}; expected {expected}")
    return names == TRAIN_COLUMNS


def _continues(start_line: str, has_labels: bool) -> bool:
    """Whether a record may span lines: only a quoted caption can hold a line break."""
    rest = start_line[_RECORD_START.match(start_line).end():]
    if has_labels:
        field = _LABELS_FIELD.match(rest)
        if field is None:
            return False
        rest = rest[field.end():]
    return rest.startswith('"')


def _parse_labels(path: Path, line: int, text: str) -> tuple[int, ...]:
    tokens = text.split()
    if not tokens:
        raise AnnotationError(path, line, "empty label list")
    for token in tokens:
        if not _INTEGER.match(token):
            hint = " (labels are separated by spaces: \"1 3\")" if re.search(r"[0-9][,;][0-9]", token) else ""
            raise AnnotationError(path, line, f"label {token!r} is not a non-negative integer{hint}")
    return tuple(int(token) for token in tokens)


def _parse_caption(path: Path, line: int, raw: str) -> str:
    if not raw.startswith('"'):
        return raw
    if len(raw) < 2 or not raw.endswith('"'):
        raise AnnotationError(path, line, f"unterminated quoted caption: {raw[:80]!r}")
    caption = raw[1:-1]
    if '""' in caption and '"' not in caption.replace('""', ""):  # RFC 4180 escaping
        caption = caption.replace('""', '"')
    return caption
