"""The evaluation store: logged predictions and their late labels, in SQLite or a shared PostgreSQL
(and, through `parquet.py`, the embedded default: Parquet files).

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
import weakref
from contextlib import contextmanager
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hotpath.serving._codec import join_bytes, split_bytes
from hotpath.serving.datatypes import DATATYPES

if TYPE_CHECKING:
    from hotpath.serving.model import Model

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

_SQLITE_BULK_INSERT = """
INSERT INTO hotpath_predictions (model, request_id, version, time_s, batch_rows, tensors, data, bytes)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[3]'),
       json_extract(value, '$[4]'), json_extract(value, '$[5]'), substr(?1, json_extract(value, '$[6]'), json_extract(value, '$[7]')),
       json_extract(value, '$[7]')
FROM json_each(?2) WHERE true ON CONFLICT DO NOTHING
"""

LabelValue = int | float | str | bool
LoggedBatch = tuple[float, int, tuple[str | None, ...], tuple[int, ...], tuple[np.ndarray | None, ...], tuple[np.ndarray | None, ...]]
"""One batch as the prediction log queues it: (time_s, model version, each request's log id (None: not logged),
each request's rows, the batch's inputs, its outputs), the tensors in config order and, for a batched model,
the requests' rows one after another; a tensor the batch does not carry is None."""


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
    return TensorEncoder([(n, d) for n, d, _ in inputs], [(n, d) for n, d, _ in outputs]).encode(
        [a for _, _, a in inputs], [a for _, _, a in outputs])


class TensorEncoder:
    """Encodes one model version's tensors for the store, its descriptions cached by shape (they rarely vary).

    The writer thread runs this for every logged request while it holds the GIL, so it does little:
    one lookup for the description, one `tobytes` per tensor.
    """

    def __init__(self, inputs: Sequence[tuple[str, str]], outputs: Sequence[tuple[str, str]]) -> None:
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._texts = tuple(i for i, (_, datatype) in enumerate((*self._inputs, *self._outputs)) if datatype == "BYTES")
        self._described: dict[tuple, str] = {}

    def encode(self, inputs: Sequence[np.ndarray | None], outputs: Sequence[np.ndarray | None]) -> tuple[str, bytes]:
        """(tensors, data) for one request; a tensor given as None (an optional input left out, an output not
        returned) is not stored."""
        arrays = (*inputs, *outputs)
        parts = [None if a is None else join_bytes(a.ravel()) if i in self._texts else a.tobytes() for i, a in enumerate(arrays)] \
            if self._texts else [None if a is None else a.tobytes() for a in arrays]
        return self._describe(arrays, [None if part is None else len(part) for part in parts]), \
            b"".join([part for part in parts if part is not None])

    def describe(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> str:
        """The `tensors` description of one request whose tensors hold no BYTES, from their shapes alone."""
        arrays = (*inputs, *outputs)
        return self._describe(arrays, [a.nbytes for a in arrays])

    def _describe(self, arrays: Sequence[np.ndarray | None], sizes: Sequence[int | None]) -> str:
        key = tuple(None if a is None else (a.shape, size) for a, size in zip(arrays, sizes))
        described = self._described.get(key)
        if described is None:
            roles = [("input", spec) for spec in self._inputs] + [("output", spec) for spec in self._outputs]
            described = json.dumps([[name, role, datatype, list(k[0]), k[1]] for (role, (name, datatype)), k in zip(roles, key)
                                    if k is not None], separators=(",", ":"))
            self._described[key] = described
        return described


_ENCODERS: weakref.WeakKeyDictionary[Model, TensorEncoder] = weakref.WeakKeyDictionary()


def encoder_of(model: Model) -> TensorEncoder:
    """The tensor encoder of one served model version, made once."""
    encoder = _ENCODERS.get(model)
    if encoder is None:
        encoder = _ENCODERS[model] = TensorEncoder([(s.name, s.datatype.name) for s in model.inputs],
                                                   [(s.name, s.datatype.name) for s in model.outputs])
    return encoder


@dataclass
class EncodedRequests:
    """Logged requests of one model version and shape, encoded: `data` is a (request, byte) matrix whose rows
    are their `data` blobs; `times` holds (time_s, requests) of each batch they came in, in order."""

    version: int
    rows: int
    described: str
    data: np.ndarray
    ids: list[str] = field(default_factory=list)
    times: list[tuple[float, int]] = field(default_factory=list)

    def each_time(self) -> np.ndarray:
        """The time of each request."""
        return np.repeat([time_s for time_s, _ in self.times], [count for _, count in self.times])


def add_encoded(runs: list[tuple[int, EncodedRequests]], buffer: np.ndarray, start: int, width: int, version: int, rows: int,
                described: str, ids: list[str], times: list[tuple[float, int]]) -> None:
    """Record requests whose `data` rows (`width` bytes each) were just copied into `buffer` from `start`: they extend
    the last of `runs` (each: where it begins in `buffer`, its requests) when that is of the same kind and ends at
    `start`, else begin a new run."""
    end = start + len(ids) * width
    if runs:
        first, last = runs[-1]
        if (last.version, last.rows, last.described, last.data.shape[1]) == (version, rows, described, width) \
                and first + last.data.nbytes == start:
            last.data = buffer[first:end].reshape(-1, width)
            last.ids += ids
            last.times += times
            return
    runs.append((start, EncodedRequests(version, rows, described, buffer[start:end].reshape(-1, width), list(ids), list(times))))


def logged_requests(batch: LoggedBatch, batched: bool) -> Iterator[tuple[str, int, list, list]]:
    """(log id, rows, inputs, outputs) of each logged request of a batch, its tensors sliced from the batch's."""
    _, _, ids, rows, inputs, outputs = batch
    start = 0
    for log_id, count in zip(ids, rows):
        if log_id is not None:
            if batched:
                yield (log_id, count, [None if a is None else a[start:start + count] for a in inputs],
                       [None if a is None else a[start:start + count] for a in outputs])
            else:
                yield log_id, count, list(inputs), list(outputs)
        start += count


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


SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def default_store_path(model_dir: Path) -> Path:
    """Where a model's predictions go when its config names no store: a Parquet store in the model's directory."""
    return model_dir / "evaluation" / "store"


def open_store(location: str | Path) -> Store:
    """The store at `location`: a `postgresql://` URL, a SQLite file (.sqlite, .sqlite3, .db) or a Parquet store directory."""
    text = str(location)
    if text.startswith(POSTGRES_SCHEMES) or text.endswith(SQLITE_SUFFIXES):
        return Store(text)
    from hotpath.evaluation.parquet import ParquetStore

    return ParquetStore(text)


class Store:
    """A connection to one SQL evaluation store (a SQLite file or a PostgreSQL URL), used by one thread.

    Every write commits before it returns, so a killed writer loses at most what it had not yet written.
    """

    drain_interval_s = 0.1
    """How often the prediction log's writer hands this store what is queued: each hand-off is one transaction."""
    drain_rows = 4096
    """Queued requests at which the writer hands them over before `drain_interval_s` has passed."""

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

    def write_batches(self, name: str, batches: Iterable[LoggedBatch], models: Mapping[int, Model]) -> None:
        """Store the logged requests of model `name`'s batches; `models` holds the served model of each version they name."""
        records = []
        for batch in batches:
            model = models[batch[1]]
            encoder = encoder_of(model)
            for log_id, rows, inputs, outputs in logged_requests(batch, model.batched):
                tensors, data = encoder.encode(inputs, outputs)
                records.append((name, log_id, model.version, batch[0], rows, tensors, data))
        self.write_predictions(records)

    def write_encoded(self, name: str, encoded: Iterable[EncodedRequests]) -> None:
        """Store requests of model `name` that the log encoded as they were staged."""
        self.write_predictions((name, log_id, run.version, time_s, run.rows, run.described, row.tobytes())
                               for run in encoded for log_id, time_s, row in zip(run.ids, run.each_time(), run.data))

    def write_predictions(self, rows: Iterable[tuple[str, str, int, float, int, str, bytes]]) -> None:
        """Store (model, request id, version, time_s, rows, tensors, data) records in one transaction; an id
        already stored for the model keeps its first record."""
        records = list(rows)
        if not records:
            return
        with self._transaction() as cursor:
            if self.postgres:
                cursor.executemany(
                    "INSERT INTO hotpath_predictions (model, request_id, version, time_s, batch_rows, tensors, data, bytes) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", [(*row, len(row[6])) for row in records])
                return
            # One statement for the whole batch: sqlite3 releases the GIL for each step of `executemany`,
            # and taking it back once per row would stall the event loop; this is one step.
            described, position = [], 1
            for model, request_id, version, time_s, batch_rows, tensors, data in records:
                described.append((model, request_id, version, time_s, batch_rows, tensors, position, len(data)))
                position += len(data)
            cursor.execute(_SQLITE_BULK_INSERT, (b"".join([row[6] for row in records]), json.dumps(described)))

    def attach_labels(self, model: str, labels: Sequence[tuple[str, int, LabelValue]], time_s: float) -> list[tuple[str, int]]:
        """Store (request id, row, value) labels of `model`'s logged predictions; returns the (id, row) pairs
        that match no logged prediction row, which are not stored. A second label for a row replaces the first."""
        unknown = []
        with self._transaction() as cursor:
            rows_of = self._rows_of(cursor, model, sorted({request_id for request_id, _, _ in labels}))
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

    def _rows_of(self, cursor, model: str, ids: list[str]) -> dict[str, int]:
        """Rows of each of `ids` that `model` logged (ids it did not log are absent)."""
        known = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            cursor.execute(self._sql(f"SELECT request_id, batch_rows FROM hotpath_predictions WHERE model = ? AND request_id IN "
                                     f"({', '.join('?' * len(chunk))})"), (model, *chunk))
            known.update(cursor.fetchall())
        return known

    def flush(self, force: bool = False) -> None:
        """Write what `write_predictions` buffered when it is due (or now, with `force`); SQL stores buffer nothing."""

    def compact(self, model: str) -> int:
        """Merge what the store keeps in many small pieces; returns the pieces merged away (SQL stores keep none)."""
        return 0

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
        cursor = self._db.cursor()
        cursor.execute(self._sql("SELECT request_id, row_index, label FROM hotpath_labels WHERE model = ?"), (model,))
        labels: dict[str, dict[int, LabelValue]] = {}
        for request_id, row, label in cursor.fetchall():
            labels.setdefault(request_id, {})[row] = json.loads(label)
        cursor.close()
        for request_id, version, time_s, rows, tensors, data in self._records(model, since_s, until_s):
            inputs, outputs = decode_tensors(tensors, bytes(data))
            known = labels.get(request_id, {})
            yield Prediction(request_id, version, time_s, rows, inputs, outputs, [known.get(row) for row in range(rows)])
        self._db.commit()

    def _records(self, model: str, since_s: float | None, until_s: float | None) -> Iterator[tuple]:
        """(request id, version, time_s, rows, tensors, data) of `model` in [since_s, until_s), oldest first."""
        where, params = ["model = ?"], [model]
        if since_s is not None:
            where.append("time_s >= ?")
            params.append(since_s)
        if until_s is not None:
            where.append("time_s < ?")
            params.append(until_s)
        cursor = self._db.cursor()
        cursor.execute(self._sql(f"SELECT request_id, version, time_s, batch_rows, tensors, data FROM hotpath_predictions "
                                 f"WHERE {' AND '.join(where)} ORDER BY time_s, request_id"), params)
        yield from cursor
        cursor.close()

    def _prediction_count(self, model: str) -> int:
        cursor = self._db.cursor()
        cursor.execute(self._sql("SELECT COUNT(*) FROM hotpath_predictions WHERE model = ?"), (model,))
        (count,) = cursor.fetchone()
        cursor.close()
        return count

    def counts(self, model: str) -> tuple[int, int]:
        """(logged predictions, labelled rows) of `model`."""
        cursor = self._db.cursor()
        cursor.execute(self._sql("SELECT COUNT(*) FROM hotpath_labels WHERE model = ?"), (model,))
        (labels,) = cursor.fetchone()
        cursor.close()
        self._db.commit()
        return self._prediction_count(model), labels
