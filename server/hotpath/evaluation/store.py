"""The evaluation store: logged predictions and their late labels, in SQLite or a shared PostgreSQL.

Two tables, the same in both databases. `hotpath_predictions` holds one row per logged request:
model, request id, version, time, rows, and its tensors (a JSON list of name, role, datatype and
shape and byte length, and one blob of their bytes in that order: raw little-endian values, BYTES as 4-byte
length-prefixed elements as in OIP raw contents). `hotpath_labels` holds one ground truth per
request row, as a JSON scalar. A Store object belongs to the thread that opened it.
"""

from __future__ import annotations

import json
import math
import sqlite3
from contextlib import contextmanager
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hotpath.serving._codec import join_bytes, split_bytes
from hotpath.serving.datatypes import DATATYPES

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for another process's transaction (the server and `hotpath label`)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hotpath_predictions (
    model TEXT NOT NULL, request_id TEXT NOT NULL, version INTEGER NOT NULL, time_s DOUBLE PRECISION NOT NULL,
    batch_rows INTEGER NOT NULL, tensors TEXT NOT NULL, data {blob} NOT NULL, bytes BIGINT NOT NULL,
    PRIMARY KEY (model, request_id));
CREATE INDEX IF NOT EXISTS hotpath_predictions_time ON hotpath_predictions (model, time_s);
CREATE TABLE IF NOT EXISTS hotpath_labels (
    model TEXT NOT NULL, request_id TEXT NOT NULL, row_index INTEGER NOT NULL, label TEXT NOT NULL,
    time_s DOUBLE PRECISION NOT NULL, PRIMARY KEY (model, request_id, row_index));
"""

LabelValue = int | float | str | bool


class StoreError(Exception):
    """The store cannot be opened or read; the message says which and why."""


@dataclass(frozen=True)
class Prediction:
    """One logged request: its tensors by name (batch first) and the labels of its rows (None if unlabelled)."""

    request_id: str
    version: int
    time_s: float
    rows: int
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    labels: list[LabelValue | None]


def encode_tensors(inputs: Sequence[tuple[str, str, np.ndarray]], outputs: Sequence[tuple[str, str, np.ndarray]]) -> tuple[str, bytes]:
    """The `tensors` description and `data` blob of one request's (name, datatype, array) inputs and outputs."""
    described, parts = [], []
    for role, tensors in (("input", inputs), ("output", outputs)):
        for name, datatype, array in tensors:
            part = join_bytes(array.ravel()) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            described.append([name, role, datatype, list(array.shape), len(part)])
            parts.append(part)
    return json.dumps(described, separators=(",", ":")), b"".join(parts)


def decode_tensors(tensors: str, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of `encode_tensors`: inputs and outputs by name (BYTES as object arrays of bytes)."""
    found: dict[str, dict[str, np.ndarray]] = {"input": {}, "output": {}}
    offset = 0
    view = memoryview(data)
    for name, role, datatype, shape, size in json.loads(tensors):
        count = math.prod(shape)
        if datatype == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = split_bytes(view[offset:offset + size], count)
        else:
            array = np.frombuffer(data, DATATYPES[datatype].dtype, count, offset)
        found[role][name] = array.reshape(shape)
        offset += size
    return found["input"], found["output"]


def default_store_path(model_dir: Path) -> Path:
    """Where a model's predictions go when its config names no store."""
    return model_dir / "evaluation" / "store.sqlite"


class Store:
    """A connection to one evaluation store (a SQLite file or a PostgreSQL URL), used by one thread.

    Every write commits before it returns, so a killed writer loses at most what it had not yet written.
    """

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.postgres = self.location.startswith(POSTGRES_SCHEMES)
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise StoreError(f"store {self.location} is PostgreSQL, which needs psycopg: pip install 'hotpath[postgres]'") from None
            try:
                self._db = psycopg.connect(self.location, autocommit=False)
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to the evaluation store {self.location}: {exc}") from None
            self._param = "%s"
        else:
            path = Path(self.location)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._param = "?"
        with self._transaction() as cursor:
            for statement in _SCHEMA.format(blob="BYTEA" if self.postgres else "BLOB").split(";"):
                if statement.strip():
                    cursor.execute(statement)

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self._param)

    @contextmanager
    def _transaction(self) -> Iterator:
        """A cursor whose statements commit together, or roll back when one fails."""
        cursor = self._db.cursor()
        try:
            yield cursor
            self._db.commit()
        except BaseException:
            self._db.rollback()
            raise
        finally:
            cursor.close()

    def close(self) -> None:
        self._db.close()

    def write_predictions(self, rows: Iterable[tuple[str, str, int, float, int, str, bytes]]) -> None:
        """Store (model, request id, version, time_s, rows, tensors, data) records in one transaction; an id
        already stored for the model keeps its first record."""
        records = [(*row, len(row[6])) for row in rows]
        if not records:
            return
        conflict = "ON CONFLICT DO NOTHING"
        with self._transaction() as cursor:
            cursor.executemany(self._sql(
                "INSERT INTO hotpath_predictions (model, request_id, version, time_s, batch_rows, tensors, data, bytes) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?, ?) {conflict}"), records)

    def attach_labels(self, model: str, labels: Sequence[tuple[str, int, LabelValue]], time_s: float) -> list[tuple[str, int]]:
        """Store (request id, row, value) labels of `model`'s logged predictions; returns the (id, row) pairs
        that match no logged prediction row, which are not stored. A second label for a row replaces the first."""
        unknown = []
        with self._transaction() as cursor:
            known = set()
            ids = sorted({request_id for request_id, _, _ in labels})
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                cursor.execute(self._sql(f"SELECT request_id, batch_rows FROM hotpath_predictions WHERE model = ? AND request_id IN "
                                         f"({', '.join('?' * len(chunk))})"), (model, *chunk))
                known.update(cursor.fetchall())
            rows_of = dict(known)
            stored = []
            for request_id, row, value in labels:
                if 0 <= row < rows_of.get(request_id, 0):
                    stored.append((model, request_id, row, json.dumps(value), time_s))
                else:
                    unknown.append((request_id, row))
            cursor.executemany(self._sql(
                "INSERT INTO hotpath_labels (model, request_id, row_index, label, time_s) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (model, request_id, row_index) DO UPDATE SET label = excluded.label, time_s = excluded.time_s"), stored)
        return unknown

    def retain(self, model: str, now_s: float, max_age_s: float = 0, max_size_bytes: int = 0) -> int:
        """Delete `model`'s predictions older than `max_age_s` and, beyond `max_size_bytes` of stored tensor
        bytes, the oldest; their labels go with them. Returns the predictions deleted."""
        deleted = 0
        with self._transaction() as cursor:
            if max_age_s > 0:
                cursor.execute(self._sql("DELETE FROM hotpath_predictions WHERE model = ? AND time_s < ?"), (model, now_s - max_age_s))
                deleted += max(cursor.rowcount, 0)
            if max_size_bytes > 0:
                cursor.execute(self._sql(
                    "SELECT MAX(time_s) FROM (SELECT time_s, SUM(bytes) OVER (ORDER BY time_s DESC, request_id) AS newer "
                    "FROM hotpath_predictions WHERE model = ?) AS ranked WHERE newer > ?"), (model, max_size_bytes))
                (cutoff,) = cursor.fetchone()
                if cutoff is not None:
                    cursor.execute(self._sql("DELETE FROM hotpath_predictions WHERE model = ? AND time_s <= ?"), (model, cutoff))
                    deleted += max(cursor.rowcount, 0)
            if deleted:
                cursor.execute(self._sql(
                    "DELETE FROM hotpath_labels WHERE model = ? AND NOT EXISTS (SELECT 1 FROM hotpath_predictions p "
                    "WHERE p.model = hotpath_labels.model AND p.request_id = hotpath_labels.request_id)"), (model,))
        return deleted

    def predictions(self, model: str, since_s: float | None = None, until_s: float | None = None) -> Iterator[Prediction]:
        """`model`'s logged predictions in [since_s, until_s), oldest first, with their labels."""
        where, params = ["model = ?"], [model]
        if since_s is not None:
            where.append("time_s >= ?")
            params.append(since_s)
        if until_s is not None:
            where.append("time_s < ?")
            params.append(until_s)
        cursor = self._db.cursor()
        cursor.execute(self._sql("SELECT request_id, row_index, label FROM hotpath_labels WHERE model = ?"), (model,))
        labels: dict[str, dict[int, LabelValue]] = {}
        for request_id, row, label in cursor.fetchall():
            labels.setdefault(request_id, {})[row] = json.loads(label)
        cursor.execute(self._sql(f"SELECT request_id, version, time_s, batch_rows, tensors, data FROM hotpath_predictions "
                                 f"WHERE {' AND '.join(where)} ORDER BY time_s, request_id"), params)
        for request_id, version, time_s, rows, tensors, data in cursor:
            inputs, outputs = decode_tensors(tensors, bytes(data))
            known = labels.get(request_id, {})
            yield Prediction(request_id, version, time_s, rows, inputs, outputs, [known.get(row) for row in range(rows)])
        cursor.close()
        self._db.commit()

    def counts(self, model: str) -> tuple[int, int]:
        """(logged predictions, labelled rows) of `model`."""
        cursor = self._db.cursor()
        cursor.execute(self._sql("SELECT COUNT(*) FROM hotpath_predictions WHERE model = ?"), (model,))
        (predictions,) = cursor.fetchone()
        cursor.execute(self._sql("SELECT COUNT(*) FROM hotpath_labels WHERE model = ?"), (model,))
        (labels,) = cursor.fetchone()
        cursor.close()
        self._db.commit()
        return predictions, labels
