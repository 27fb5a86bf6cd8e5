"""Label files for `hotpath label`: CSV, JSON lines or Parquet rows of request id, optional row, and ground truth."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path

from hotpath.evaluation.store import LabelValue

ID_COLUMNS = ("id", "request_id")
LABEL_COLUMNS = ("label", "ground_truth")


class LabelFileError(Exception):
    """A label file that cannot be read; the message names the file and the problem."""


def _scalar(value: object) -> LabelValue:
    """A label as JSON stores it: CSV text becomes a number when it reads as one; integral floats become ints."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, str):
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                continue
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _records(path: Path) -> Iterable[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as file:
            yield from csv.DictReader(file)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise LabelFileError(f"{path}:{number}: not a JSON object: {exc}") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise LabelFileError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
        yield from parquet.read_table(path).to_pylist()
    else:
        raise LabelFileError(f"{path}: label files must be .csv, .jsonl (or .ndjson) or .parquet, got '{path.suffix}'")


def read_labels(path: Path) -> list[tuple[str, int, LabelValue]]:
    """(request id, row, label) of every record; `row` defaults to 0 (single-row requests)."""
    labels = []
    try:
        for number, record in enumerate(_records(path), 1):
            id_column = next((c for c in ID_COLUMNS if c in record), None)
            label_column = next((c for c in LABEL_COLUMNS if c in record), None)
            if id_column is None or label_column is None:
                raise LabelFileError(f"{path}: record {number} must have an id column ({' or '.join(ID_COLUMNS)}) and a label "
                                     f"column ({' or '.join(LABEL_COLUMNS)}), got {sorted(record)}")
            value = record[label_column]
            if value is None or value == "":
                raise LabelFileError(f"{path}: record {number} (id {record[id_column]}) has no label")
            row = record.get("row")
            labels.append((str(record[id_column]), int(row) if row not in (None, "") else 0, _scalar(value)))
    except OSError as exc:
        raise LabelFileError(f"cannot read {path}: {exc}") from None
    return labels
