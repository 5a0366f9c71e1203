"""A party's own labelled texts from a CSV or JSONL file (``data.dataset = "files"``).

In a deployment every SuperNode reads its own file (node config ``data-path``) and the
server reads the global test file (``data.test_path``). All of them map labels through the
same ``data.label_names``, so label ``k`` means the same class everywhere. A label may be given
by name or by its index (ASCII digits). Files are UTF-8 (a byte order mark is allowed); a text
must be text (a JSON ``null`` is refused), and a CSV field may be as long as a document is.
Every problem is a one-line ``ConfigError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from fedtune.config import ConfigError
from fedtune.data.sources import LabelledData, build_text_data
from fedtune.errors import one_line

ENCODING = "utf-8-sig"  # UTF-8, with or without a byte order mark
MAX_FIELD_CHARS = 2**27  # one CSV field (a whole document); csv's default stops at 131,072


def _label(value: object, label_names: tuple[str, ...], where: str) -> str:
    if value is None or isinstance(value, (bool, dict, list)):
        raise ConfigError(f"{where}: label {value!r} is not allowed: must be one of "
                          + ", ".join(repr(n) for n in label_names) + " or their index")
    text = str(value).strip()
    if text in label_names:
        return text
    if text.isascii() and text.isdigit() and int(text) < len(label_names):
        return label_names[int(text)]
    raise ConfigError(f"{where}: label {text!r} is not allowed: must be one of "
                      + ", ".join(repr(n) for n in label_names) + " or their index")


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: text {value!r} is not allowed: must be a string")
    return value


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file (a leading byte order mark dropped); a line that
    is not UTF-8 is a ConfigError naming it."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(ENCODING if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}:{number}: not UTF-8 text (byte "
                                  f"{err.object[err.start]:#04x})") from None
            yield number, line


def _reads_as_row(line: str, columns: int, label_at: int,
                  label_names: tuple[str, ...]) -> bool:
    """Whether ``line`` parses as a whole record of the file: as many fields as the header,
    a label where the label column is."""
    try:
        fields = next(csv.reader([line]), [])
    except csv.Error:
        return False
    if len(fields) != columns:
        return False
    label = fields[label_at].strip()
    return label in label_names or (label.isascii() and label.isdigit()
                                    and int(label) < len(label_names))


def _merged_row(record: dict[str, str], columns: list[str], label_column: str,
                label_names: tuple[str, ...]) -> str | None:
    """A line inside a field of a multi-line record that reads as a record of its own: the
    sign of a quote opened by mistake that a later quote happened to close."""
    label_at = columns.index(label_column)
    for value in record.values():
        for line in (value or "").split("\n")[1:]:
            if _reads_as_row(line, len(columns), label_at, label_names):
                return line
    return None


def _csv_rows(path: Path, text_column: str, label_column: str,
              label_names: tuple[str, ...]) -> list[tuple[object, object, str]]:
    """(text, label, where) per CSV record (``strict``: a quote must close right before a
    delimiter or the end of a line). A quoted text may span lines; a quote left open, or one
    whose field swallowed a line that reads as a row, is an error naming the line where it
    opened."""
    csv.field_size_limit(MAX_FIELD_CHARS)
    reader = csv.DictReader((line for _, line in _lines(path)), strict=True)
    rows, start = [], 2  # reader.reader.line_num: DictReader's own is stale after an error
    try:
        missing = {text_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{path}: the header lacks {sorted(missing)} (data.text_column, "
                              "data.label_column)")
        start = reader.reader.line_num + 1
        for record in reader:
            where = f"{path}:{start}"
            if record[text_column] is None or record[label_column] is None:
                raise ConfigError(f"{where}: the row has fewer fields than the header")
            end = reader.reader.line_num
            if end > start:
                merged = _merged_row(record, list(reader.fieldnames or []), label_column,
                                     label_names)
                if merged is not None:
                    raise ConfigError(
                        f"{where}: the quoted field that starts on this line runs to line "
                        f"{end} and holds {one_line(merged, 80)!r}, which reads as a row of its "
                        "own: close the quote (a quote inside a quoted text is written twice)")
            rows.append((record[text_column], record[label_column], where))
            start = reader.reader.line_num + 1
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            raise ConfigError(f"{path}:{start}: a quote opened on this line is never closed "
                              "(the file ends inside it)") from None
        raise ConfigError(f"{path}:{start}: not a valid CSV record ({err}): it starts here and "
                          f"ends on line {reader.reader.line_num}") from None
    return rows


def _rows(path: Path, text_column: str, label_column: str, label_names: tuple[str, ...]
          ) -> list[tuple[object, object, str]]:
    """(text, label, where) per record."""
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in _lines(path):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where} is not valid JSON: {err.msg}") from None
            if not isinstance(record, dict) or text_column not in record \
                    or label_column not in record:
                raise ConfigError(f"{where}: each line must be an object with "
                                  f"{text_column!r} and {label_column!r}")
            rows.append((_text(record[text_column], where), record[label_column], where))
        return rows
    return _csv_rows(path, text_column, label_column, label_names)


@lru_cache(maxsize=4)
def load_party_file(path: str, label_names: tuple[str, ...], text_column: str = "text",
                    label_column: str = "label") -> LabelledData:
    """Texts and labels of one file, deduplicated like the bundled datasets."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"data file {path!r} does not exist")
    records = _rows(file, text_column, label_column, label_names)
    if not records:
        raise ConfigError(f"data file {path!r} holds no examples")
    texts = [str(text) for text, _, _ in records]
    labels = [_label(label, label_names, where) for _, label, where in records]
    return build_text_data(f"files-{file.stem}", texts, labels, label_names=label_names)
