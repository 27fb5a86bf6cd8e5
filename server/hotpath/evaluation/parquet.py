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
from collections.abc import Iterable, Iterator
from pathlib import Path

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

    def __init__(self, directory: str | Path) -> None:
        self.pa = _pyarrow()
        self.directory = Path(directory)
        super().__init__(self.directory / "labels.sqlite")
        self.location = str(self.directory)
        self._buffer: list[tuple] = []
        self._buffered_bytes = 0
        self._buffer_since = 0.0

    def _files(self, model: str) -> list[tuple[int, int, Path]]:
        """(first ns, last ns, path) of `model`'s segment files, oldest first."""
        found = []
        for path in (self.directory / model).glob("*.parquet"):
            first, last, _ = path.stem.split("-", 2)
            found.append((int(first), int(last), path))
        return sorted(found)

    def write_predictions(self, rows: Iterable[tuple[str, str, int, float, int, str, bytes]]) -> None:
        """Buffer records for the next segment file; it is written once due (see `flush`)."""
        for row in rows:
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer.append(row)
            self._buffered_bytes += len(row[6])
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Write the buffered segment when SEGMENT_S have passed or SEGMENT_BYTES are buffered, or now with `force`."""
        if not self._buffer or not (force or self._buffered_bytes >= SEGMENT_BYTES
                                    or time.monotonic() - self._buffer_since >= SEGMENT_S):
            return
        buffered, self._buffer, self._buffered_bytes = self._buffer, [], 0
        by_model: dict[str, list[tuple]] = {}
        for row in buffered:
            by_model.setdefault(row[0], []).append(row)
        for model, records in by_model.items():
            table = self.pa.table({name: [row[i] for row in records] for i, name in enumerate(COLUMNS[:-1])}
                                  | {"data": self.pa.array([row[6] for row in records], self.pa.binary())})
            times = [row[3] for row in records]
            folder = self.directory / model
            partial = folder / PARTIAL_DIR
            partial.mkdir(parents=True, exist_ok=True)
            name = f"{math.floor(min(times) * 1e9):020d}-{math.ceil(max(times) * 1e9):020d}-{secrets.token_hex(4)}.parquet"
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
