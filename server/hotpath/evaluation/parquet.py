"""The embedded evaluation store: predictions as Parquet files that pandas, polars and DuckDB read directly,
labels in a SQLite file beside them.

Layout: `<dir>/<model>/<first ns>-<last ns>-<token>.parquet`, one file per segment (every
SEGMENT_S, or sooner once SEGMENT_BYTES are buffered), each written whole under `.partial/` and
renamed into place, so a killed server leaves only complete files and loses at most the segment it
was buffering; the writer merges small files every minute (`compact`). Columns: model, request_id, version, time_s, batch_rows, tensors, data (as in
`store.py`); a request id logged twice counts once, its first record. Retention deletes whole files,
oldest first. Labels: `<dir>/labels.sqlite`; attaching them reads only the row groups of ROW_GROUP_ROWS
whose id range may hold a labelled id (ids the server gives count up, so theirs rarely overlap).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from hotpath.evaluation.store import EncodedRequests, Store, StoreError, add_encoded

SEGMENT_S = 10.0
"""Longest a prediction waits in memory before its segment file is written (what a killed server can lose)."""
MERGE_BELOW_BYTES = 16 << 20
"""Segment files holding less data than this are merged by `compact`, so a light log does not become thousands
of files; a busy log's segments are full (SEGMENT_BYTES) and never rewritten."""
MERGED_MARK = "m"
"""Starts the token of a merged file's name."""
REPLACES_KEY = b"hotpath.replaces"
"""The merged file's metadata key that lists the files it replaces."""
DATA_BYTES_KEY = b"hotpath.data_bytes"
"""The metadata key holding a file's tensor bytes as read back (its size on disk can be far smaller: Parquet
dictionary-encodes repeated inputs)."""
SEGMENT_BYTES = 32 << 20
"""Tensor bytes at which a segment is written early."""
ROW_GROUP_ROWS = 4096
"""Rows per row group: the writer encodes one group at a time, so a segment is written in a few MiB of memory."""
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

    drain_interval_s = 0.5
    drain_rows = 4096
    """Each hand-off costs the writer a turn at the GIL and the event loop a wait for it: at 100% sampling,
    hand-offs of 256 requests cost 12% of throughput and of 4096 about 5%."""

    def __init__(self, directory: str | Path) -> None:
        self.pa = _pyarrow()
        self.directory = Path(directory)
        super().__init__(self.directory / "labels.sqlite")
        self.location = str(self.directory)
        self.schema = self.pa.schema([("model", self.pa.string()), ("request_id", self.pa.string()), ("version", self.pa.int64()),
                                      ("time_s", self.pa.float64()), ("batch_rows", self.pa.int64()), ("tensors", self.pa.string()),
                                      ("data", self.pa.binary())])
        self._encoded: dict[str, list] = {}
        """Per model, record batches of requests encoded one by one."""
        self._arena: np.ndarray | None = None
        """The buffered segment's `data` bytes of stacked requests, reused from segment to segment so that
        buffering touches no fresh memory; SEGMENT_BYTES long."""
        self._arena_used = 0
        self._runs: dict[str, list[tuple[int, EncodedRequests]]] = {}
        """Per model, the requests in the arena (each run with where it begins there), `data` a view of their bytes."""
        self._buffered_bytes = 0
        self._buffer_since: float | None = None
        """When the oldest buffered prediction was buffered; None when nothing is."""

    def _files(self, model: str) -> list[tuple[int, int, Path]]:
        """(first ns, last ns, path) of `model`'s segment files, oldest first."""
        found = []
        for path in (self.directory / model).glob("*.parquet"):
            first, last, _ = path.stem.split("-", 2)
            found.append((int(first), int(last), path))
        return sorted(found)

    def _buffered(self, data_bytes: int) -> None:
        if self._buffer_since is None:
            self._buffer_since = time.monotonic()
        self._buffered_bytes += data_bytes

    def write_encoded(self, name: str, encoded: Iterable[EncodedRequests]) -> None:
        """Buffer requests the log encoded for the next segment file: their `data` rows are copied into the
        arena in one operation per run, the rest kept as lists until the segment is written."""
        for run in encoded:
            count, width = run.data.shape
            if self._arena is None:
                self._arena = np.empty(SEGMENT_BYTES, np.uint8)
            if self._arena_used + count * width > len(self._arena):
                self.flush(force=True)
                if count * width > len(self._arena):
                    self._arena = np.empty(count * width, np.uint8)
            start = self._arena_used
            self._arena[start:start + count * width].reshape(count, width)[:] = run.data
            self._arena_used += count * width
            add_encoded(self._runs.setdefault(name, []), self._arena, start, width, run.version, run.rows, run.described,
                        run.ids, run.times)
            self._buffered(count * width)
        self.flush()

    def write_predictions(self, rows: Iterable[tuple[str, str, int, float, int, str, bytes]]) -> None:
        """Buffer encoded records for the next segment file; it is written once due (see `flush`)."""
        by_model: dict[str, list[tuple]] = {}
        for row in rows:
            by_model.setdefault(row[0], []).append(row)
        for model, records in by_model.items():
            columns = [self.pa.array([row[i] for row in records], field.type) for i, field in enumerate(self.schema)]
            self._encoded.setdefault(model, []).append(self.pa.RecordBatch.from_arrays(columns, schema=self.schema))
            self._buffered(sum(len(row[6]) for row in records))
        self.flush()

    def _run_records(self, model: str, run: EncodedRequests) -> object:
        """The record batch of one run, its `data` column the run's bytes in the arena, not copied."""
        count, width = run.data.shape
        offsets = np.arange(0, (count + 1) * width, width, dtype=np.int32)
        data = self.pa.Array.from_buffers(self.pa.binary(), count, [None, self.pa.py_buffer(offsets), self.pa.py_buffer(run.data.reshape(-1))])
        return self.pa.RecordBatch.from_arrays([
            self.pa.repeat(self.pa.scalar(model, self.pa.string()), count), self.pa.array(run.ids, self.pa.string()),
            self.pa.array(np.full(count, run.version, np.int64)), self.pa.array(run.each_time()),
            self.pa.array(np.full(count, run.rows, np.int64)), self.pa.repeat(self.pa.scalar(run.described, self.pa.string()), count),
            data], schema=self.schema)

    def flush(self, force: bool = False) -> None:
        """Write the buffered segment when SEGMENT_S have passed or SEGMENT_BYTES are buffered, or now with `force`."""
        if self._buffer_since is None or not (
                force or self._buffered_bytes >= SEGMENT_BYTES or time.monotonic() - self._buffer_since >= SEGMENT_S):
            return
        parts = {model: list(records) for model, records in self._encoded.items()}
        for model, runs in self._runs.items():
            parts.setdefault(model, []).extend(self._run_records(model, run) for _, run in runs)
        self._encoded, self._runs, self._arena_used, self._buffered_bytes, self._buffer_since = {}, {}, 0, 0, None
        for model, records in parts.items():
            self._write_segment(model, self.pa.Table.from_batches(records, schema=self.schema))

    def _write_segment(self, model: str, table, metadata: dict[bytes, str] | None = None, mark: str = "") -> None:
        """Write `table` as one of `model`'s segment files, its `data` bytes and `metadata` in the file's metadata:
        whole under `.partial/`, then renamed into place."""
        data_bytes = self.pa.compute.sum(self.pa.compute.binary_length(table["data"])).as_py() or 0
        table = table.replace_schema_metadata({**(metadata or {}), DATA_BYTES_KEY: str(data_bytes)})
        low, high = self.pa.compute.min_max(table["time_s"]).values()
        folder = self.directory / model
        partial = folder / PARTIAL_DIR
        partial.mkdir(parents=True, exist_ok=True)
        name = f"{math.floor(low.as_py() * 1e9):020d}-{math.ceil(high.as_py() * 1e9):020d}-{mark}{secrets.token_hex(4)}.parquet"
        self.pa.parquet.write_table(table, partial / name, compression="none", row_group_size=ROW_GROUP_ROWS)
        os.replace(partial / name, folder / name)

    def _rows_of(self, cursor, model: str, ids: list[str]) -> dict[str, int]:
        """Rows of each of `ids` that `model` logged, reading only the row groups whose id range holds one of them."""
        wanted = sorted(ids)
        value_set = self.pa.array(wanted, self.pa.string())
        known = {}
        for _, _, path in self._files(model):
            with self.pa.parquet.ParquetFile(path) as segment:
                groups = self._groups_holding(segment.metadata, wanted)
                if not groups:
                    continue
                table = segment.read_row_groups(groups, columns=["request_id", "batch_rows"])
            hits = table.filter(self.pa.compute.is_in(table["request_id"], value_set=value_set))
            known.update(zip(hits["request_id"].to_pylist(), hits["batch_rows"].to_pylist()))
        return known

    @staticmethod
    def _groups_holding(metadata, wanted: list[str]) -> list[int]:
        """The row groups whose request id statistics (min and max) leave room for one of `wanted` (sorted)."""
        column = COLUMNS.index("request_id")
        groups = []
        for index in range(metadata.num_row_groups):
            statistics = metadata.row_group(index).column(column).statistics
            if statistics is None or not statistics.has_min_max:
                groups.append(index)
                continue
            first = bisect.bisect_left(wanted, statistics.min)
            if first < len(wanted) and wanted[first] <= statistics.max:
                groups.append(index)
        return groups

    def compact(self, model: str) -> int:
        """Merge `model`'s segment files holding under MERGE_BELOW_BYTES of tensor data, oldest first, into files of
        up to SEGMENT_BYTES; returns the files merged away. A merged file names the files it replaces in its metadata, and those a
        killed merge left behind are deleted first: until then their predictions are read twice, and counted once."""
        files = self._files(model)
        for _, _, path in files:
            if MERGED_MARK in path.stem.split("-", 2)[2]:
                replaced = json.loads(self.pa.parquet.read_metadata(path).metadata.get(REPLACES_KEY, b"[]"))
                for name in replaced:
                    (path.parent / name).unlink(missing_ok=True)
        groups, group, size = [], [], 0
        for _, _, path in self._files(model):
            length = int(self.pa.parquet.read_metadata(path).metadata.get(DATA_BYTES_KEY, path.stat().st_size))
            if length >= MERGE_BELOW_BYTES or size + length > SEGMENT_BYTES:
                groups.append(group)
                group, size = [], 0
            if length < MERGE_BELOW_BYTES:
                group.append(path)
                size += length
        groups.append(group)
        merged = 0
        for group in groups:
            if len(group) < 2:
                continue
            table = self.pa.concat_tables([self.pa.parquet.read_table(path).replace_schema_metadata() for path in group])
            self._write_segment(model, table, {REPLACES_KEY: json.dumps([path.name for path in group])}, MERGED_MARK)
            for path in group:
                path.unlink()
            merged += len(group)
        return merged

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
