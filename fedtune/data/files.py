"""A party's own labelled texts from a CSV or JSONL file (``data.dataset = "files"``).

In a deployment every SuperNode reads its own file (node config ``data-path``) and the
server reads the global test file (``data.test_path``). All of them map labels through the
same ``data.label_names``, so label ``k`` means the same class everywhere. A label may be given
by name or by its index.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path

from fedtune.config import ConfigError
from fedtune.data.sources import LabelledData, build_text_data


def _label(value: object, label_names: tuple[str, ...], where: str) -> str:
    text = str(value).strip()
    if text in label_names:
        return text
    if text.isdigit() and int(text) < len(label_names):
        return label_names[int(text)]
    raise ConfigError(f"{where}: label {text!r} is not allowed: must be one of "
                      + ", ".join(repr(n) for n in label_names) + " or their index")


def _rows(path: Path, text_column: str, label_column: str) -> list[tuple[object, object, str]]:
    """(text, label, where) per record."""
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
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
                rows.append((record[text_column], record[label_column], where))
        return rows
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {text_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{path}: the header lacks {sorted(missing)} (data.text_column, "
                              "data.label_column)")
        for number, record in enumerate(reader, start=2):
            rows.append((record[text_column], record[label_column], f"{path}:{number}"))
    return rows


@lru_cache(maxsize=4)
def load_party_file(path: str, label_names: tuple[str, ...], text_column: str = "text",
                    label_column: str = "label") -> LabelledData:
    """Texts and labels of one file, deduplicated like the bundled datasets."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"data file {path!r} does not exist")
    records = _rows(file, text_column, label_column)
    if not records:
        raise ConfigError(f"data file {path!r} holds no examples")
    texts = [str(text) for text, _, _ in records]
    labels = [_label(label, label_names, where) for _, label, where in records]
    return build_text_data(f"files-{file.stem}", texts, labels, label_names=label_names)
