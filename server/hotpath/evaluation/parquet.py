"""The embedded evaluation store: predictions as Parquet files that pandas, polars and DuckDB read directly,
labels in a SQLite file beside them.

Layout: `<dir>/<model>/<first ns>-<last ns>-<token>.parquet`, one file per segment (every
SEGMENT_S, or sooner once SEGMENT_BYTES are buffered), each written whole under `.partial/` and
renamed into place, so a killed server leaves only complete files and loses at most the segment it
was buffering. Columns: model, request_id, version, time_s, batch_rows, tensors, data (as in
`store.py`); a request id logged twice counts once, its first record. Retention deletes whole files,
oldest first. Labels: `<dir>/labels.sqlite`.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from hotpath.evaluation.store import Store, StoreError

SEGMENT_S = 60.0
"""Longest a prediction waits in memory before its segment file is written."""
SEGMENT_BYTES = 32 << 20
"""Tensor bytes at which a segment is written early."""
PARTIAL_DIR = ".partial"
COLUMNS = ("model", "request_id", "version", "time_s", "batch_rows", "tensors", "data")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ImportError:
        raise StoreError("the default evaluation store writes Parquet, which needs pyarrow: pip install 'hotpath[evaluate]' "
                         "(or set evaluation.store to a .sqlite file)") from None
    return pyarrow


class ParquetStore(Store):
    """Predictions in Parquet segment files under `directory`, labels in its `labels.sqlite`; used by one thread."""

    drain_interval_s = 0.01
    """A hand-off only buffers in memory, so it comes often: requests then leave the queue within 10 ms, and
    the garbage collector and the allocator see a short queue (at 100% sampling this was 5-10% of throughput)."""

    def __init__(self, directory: str | Path) -> None:
        self.pa = _pyarrow()
        self.directory = Path(directory)
        super().__init__(self.directory / "labels.sqlite")
        self.location = str(self.directory)
        self.schema = self.pa.schema([("model", self.pa.string()), ("request_id", self.pa.string()), ("version", self.pa.int64()),
                                      ("time_s", self.pa.float64()), ("batch_rows", self.pa.int64()), ("tensors", self.pa.string()),
                                      ("data", self.pa.binary())])
        self._batches: dict[str, list] = {}
        self._buffered_bytes = 0
        self._buffer_since = 0.0

    def _files(self, model: str) -> list[tuple[int, int, Path]]:
        """(first ns, last ns, path) of `model`'s segment files, oldest first."""
        found = []
        for path in (self.directory / model).glob("*.parquet"):
            first, last, _ = path.stem.split("-", 2)
            found.append((int(first), int(last), path))
        return sorted(found)

    def _buffer(self, model: str, columns: list, data_bytes: int) -> None:
        if not self._batches:
            self._buffer_since = time.monotonic()
        self._batches.setdefault(model, []).append(self.pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._buffered_bytes += data_bytes
        self.flush()

    def write_requests(self, name: str, requests: Sequence[tuple]) -> None:
        """Buffer logged requests for the next segment file, column by column: requests of one model version
        with equal shapes become one matrix of their tensors' bytes, a row per request, with no Python work per
        tensor; requests with BYTES tensors or a missing optional input are encoded one by one."""
        groups: dict[tuple, list] = {}
        for request in requests:
            _, _, model, inputs, outputs = request
            groups.setdefault((model, *[None if a is None else a.shape for a in inputs], *[a.shape for a in outputs]), []).append(request)
        one_by_one = []
        for (model, *_), group in groups.items():
            first = (*group[0][3], *group[0][4])
            if any(a is None or a.dtype == object or a.ndim == 0 for a in first):
                one_by_one += group
                continue
            count = len(group)
            described, _ = self.encoder(model).encode(group[0][3], group[0][4])
            arrays = [(*inputs, *outputs) for _, _, _, inputs, outputs in group]
            width = sum(a.nbytes for a in first)
            blobs = np.empty((count, width), np.uint8)
            offset = 0
            for k, tensor in enumerate(first):
                blobs[:, offset:offset + tensor.nbytes] = np.concatenate([a[k] for a in arrays]).reshape(count, -1).view(np.uint8)
                offset += tensor.nbytes
            data = self.pa.Array.from_buffers(self.pa.binary(), count, [None, self.pa.py_buffer(np.arange(0, (count + 1) * width, width,
                                                                                                           dtype=np.int32)),
                                                                       self.pa.py_buffer(blobs)])
            rows = len(group[0][4][0]) if model.batched and group[0][4] else 1
            self._buffer(name, [self.pa.array([name] * count, self.pa.string()), self.pa.array([r[1] for r in group], self.pa.string()),
                                self.pa.array(np.full(count, model.version, np.int64)), self.pa.array([r[0] for r in group], self.pa.float64()),
                                self.pa.array(np.full(count, rows, np.int64)), self.pa.array([described] * count, self.pa.string()), data],
                         blobs.nbytes)
        if one_by_one:
            super().write_requests(name, one_by_one)

    def write_predictions(self, rows: Iterable[tuple[str, str, int, float, int, str, bytes]]) -> None:
        """Buffer encoded records for the next segment file; it is written once due (see `flush`)."""
        by_model: dict[str, list[tuple]] = {}
        for row in rows:
            by_model.setdefault(row[0], []).append(row)
        for model, records in by_model.items():
            columns = [self.pa.array([row[i] for row in records], field.type) for i, field in enumerate(self.schema)]
            self._buffer(model, columns, sum(len(row[6]) for row in records))

    def flush(self, force: bool = False) -> None:
        """Write the buffered segment when SEGMENT_S have passed or SEGMENT_BYTES are buffered, or now with `force`."""
        if not self._batches or not (force or self._buffered_bytes >= SEGMENT_BYTES
                                     or time.monotonic() - self._buffer_since >= SEGMENT_S):
            return
        batches, self._batches, self._buffered_bytes = self._batches, {}, 0
        for model, parts in batches.items():
            table = self.pa.Table.from_batches(parts, schema=self.schema)
            low, high = self.pa.compute.min_max(table["time_s"]).values()
            folder = self.directory / model
            partial = folder / PARTIAL_DIR
            partial.mkdir(parents=True, exist_ok=True)
            name = f"{math.floor(low.as_py() * 1e9):020d}-{math.ceil(high.as_py() * 1e9):020d}-{secrets.token_hex(4)}.parquet"
            self.pa.parquet.write_table(table, partial / name, compression="none")
            os.replace(partial / name, folder / name)

    def _rows_of(self, cursor, model: str, ids: list[str]) -> dict[str, int]:
        wanted = self.pa.array(ids, self.pa.string())
        known = {}
        for _, _, path in self._files(model):
            table = self.pa.parquet.read_table(path, columns=["request_id", "batch_rows"])
            hits = table.filter(self.pa.compute.is_in(table["request_id"], value_set=wanted))
            known.update(zip(hits["request_id"].to_pylist(), hits["batch_rows"].to_pylist()))
        return known

    def retain(self, model: str, now_s: float, max_age_s: float = 0, max_size_bytes: int = 0) -> int:
        """Delete `model`'s segment files wholly older than `max_age_s` and, beyond `max_size_bytes` of files,
        the oldest; their labels go with them. Returns the predictions deleted."""
        files = self._files(model)
        doomed = [path for _, last, path in files if max_age_s > 0 and last / 1e9 < now_s - max_age_s]
        if max_size_bytes > 0:
            total = 0
            for _, _, path in reversed(files):
                total += path.stat().st_size
                if total > max_size_bytes and path not in doomed:
                    doomed.append(path)
        deleted = 0
        for path in doomed:
            ids = self.pa.parquet.read_table(path, columns=["request_id"])["request_id"].to_pylist()
            with self._transaction() as cursor:
                cursor.executemany("DELETE FROM hotpath_labels WHERE model = ? AND request_id = ?", [(model, i) for i in ids])
            path.unlink()
            deleted += len(ids)
        return deleted

    def _records(self, model: str, since_s: float | None, until_s: float | None) -> Iterator[tuple]:
        low = -float("inf") if since_s is None else since_s
        high = float("inf") if until_s is None else until_s
        records = []
        for first, last, path in self._files(model):
            if last / 1e9 < low or first / 1e9 >= high:
                continue
            table = self.pa.parquet.read_table(path, columns=list(COLUMNS[1:]))
            records += [row for row in zip(*(table[c].to_pylist() for c in COLUMNS[1:])) if low <= row[2] < high]
        records.sort(key=lambda row: (row[2], row[0]))
        seen = set()
        for row in records:
            if row[0] not in seen:
                seen.add(row[0])
                yield row

    def _prediction_count(self, model: str) -> int:
        ids = set()
        for _, _, path in self._files(model):
            ids.update(self.pa.parquet.read_table(path, columns=["request_id"])["request_id"].to_pylist())
        return len(ids)

    def close(self) -> None:
        """Write what is buffered, then close the labels database."""
        self.flush(force=True)
        super().close()
