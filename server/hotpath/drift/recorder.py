"""The in-server drift recorder: per-window feature counts, written atomically as JSON files.

`record` only hands the batch to a queue; one background thread per model version does the
vectorised counting, rolls clock-aligned windows and writes them. A full queue drops the batch and
counts the drop in the window file rather than slowing inference down. A batch is counted in the
window its `record` call fell in, unless that window was already written (the thread fell a whole
window behind), in which case it counts in the current one.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from hotpath._proto import model_config_pb2
from hotpath.drift.features import TensorFeatures, plan_features
from hotpath.drift.files import utc_iso, write_json_atomically
from hotpath.drift.reference import Reference, load_reference, reference_path
from hotpath.drift.stats import WindowStats
from hotpath.serving.config import TensorSpec

logger = logging.getLogger("hotpath.drift")

WINDOW_SCHEMA = "hotpath.drift.window"
SCHEMA_VERSION = 1
DEFAULT_WINDOW_SECONDS = 60
QUEUE_BATCHES = 4096
DRAIN_BATCHES = 1024
"""Most queued batches counted in one go."""
DRAIN_PAUSE_SECONDS = 0.05
"""Pause after each drain, so that batches accumulate and numpy sees large blocks."""


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


def default_window_dir(model_dir: Path) -> Path:
    """Where a model's windows go unless `drift.output_dir` says otherwise."""
    return model_dir / "drift" / "windows"


class DriftRecorder:
    """Records what one model version receives and predicts, per clock-aligned window."""

    def __init__(self, model_name: str, version: int, plans: list[TensorFeatures], reference: Reference | None,
                 output_dir: Path, window_seconds: int, clock: Callable[[], float] = time.time) -> None:
        self.model_name = model_name
        self.version = version
        self.output_dir = output_dir
        self.window_seconds = window_seconds
        self._plans = plans
        self._reference = reference
        self._clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._drop_lock = threading.Lock()
        self._dropped_batches = 0
        self._dropped_rows = 0
        self._failed_batches = 0
        self._file_tag = secrets.token_hex(4)
        self._sequence = itertools.count()
        self._closed = False
        output_dir.mkdir(parents=True, exist_ok=True)
        self._start_window(clock())
        self._thread = threading.Thread(target=self._run, name=f"drift-{model_name}-v{version}", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, model_name: str, version: int, model_dir: Path, config: model_config_pb2.ModelDriftConfig,
               inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> DriftRecorder:
        """A recorder for one loaded model version, configured by the model's `drift` config section.

        Loads `<model_dir>/drift/reference.json` when it exists; without it, windows still hold
        counts, missing/NaN/inf and min/max, but no histograms.
        """
        model_dir = Path(model_dir)
        plans = plan_features(inputs, outputs, config, model_name)
        path = reference_path(model_dir)
        reference = load_reference(path) if path.exists() else None
        if reference is None:
            logger.warning("model '%s': no drift reference at %s, so windows will hold counts, missing/NaN and "
                           "min/max but no histograms; build one with `hotpath reference --model-repository %s "
                           "--model %s --data FILE`", model_name, path, model_dir.parent, model_name)
        output_dir = Path(config.output_dir) if config.output_dir else default_window_dir(model_dir)
        return cls(model_name, version, plans, reference, output_dir, config.window_seconds or DEFAULT_WINDOW_SECONDS)

    def record(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Queue one executed batch (batch dim first) for counting; never blocks.

        The arrays are read later on the recorder's thread, so the caller must not modify them
        afterwards. Calls after `close` are ignored.
        """
        if self._closed:
            return
        try:
            self._queue.put_nowait((self._clock(), inputs, outputs))
        except queue.Full:
            rows = next(iter(inputs.values() or outputs.values())).shape[0]
            with self._drop_lock:
                self._dropped_batches += 1
                self._dropped_rows += rows

    def flush(self) -> None:
        """Write what the current window holds so far, and wait until it is on disk."""
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait()

    def close(self) -> None:
        """Flush the current window and stop the background thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()

    def _start_window(self, now: float) -> None:
        self._window_start = now - now % self.window_seconds
        self._window_end = self._window_start + self.window_seconds
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._stats = WindowStats(self._plans, self._reference.features if self._reference else {})

    def _run(self) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=max(0.0, self._window_end - self._clock()))]
            except queue.Empty:
                self._write_if_counted()
                self._start_window(self._clock())
                continue
            while len(items) < DRAIN_BATCHES:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]] = []
            for item in items:
                if item is _STOP or isinstance(item, _Flush):
                    self._add(pending)
                    pending = []
                    if self._stats.batches:
                        self._write()
                        self._reset_stats()
                    if item is _STOP:
                        return
                    item.done.set()
                    continue
                timestamp, inputs, outputs = item
                if timestamp >= self._window_end:
                    self._add(pending)
                    pending = []
                    self._write_if_counted()
                    self._start_window(timestamp)
                pending.append((inputs, outputs))
            self._add(pending)
            time.sleep(DRAIN_PAUSE_SECONDS)

    def _add(self, batches: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> None:
        """Count queued batches, concatenating runs that carry the same tensors so numpy works on
        a few large blocks instead of many small ones."""
        start = 0
        while start < len(batches):
            keys = (batches[start][0].keys(), batches[start][1].keys())
            end = start + 1
            while end < len(batches) and (batches[end][0].keys(), batches[end][1].keys()) == keys:
                end += 1
            run = batches[start:end]
            try:
                if len(run) == 1:
                    self._stats.add(*run[0])
                else:
                    self._stats.add(*({name: np.concatenate([b[side][name] for b in run]) for name in keys[side]}
                                      for side in (0, 1)), batches=len(run))
            except Exception:
                if not self._failed_batches:
                    logger.exception("model '%s' version %d: drift recording failed; further failures are only "
                                     "counted in the window files", self.model_name, self.version)
                self._failed_batches += len(run)
            start = end

    def _write_if_counted(self) -> None:
        """Write the window when it counted anything: a window that a flush already wrote out, or that
        saw no traffic, leaves no empty file behind."""
        with self._drop_lock:
            dropped = self._dropped_batches
        if self._stats.batches or dropped or self._failed_batches:
            self._write()

    def _write(self) -> None:
        with self._drop_lock:
            dropped_batches, dropped_rows = self._dropped_batches, self._dropped_rows
            self._dropped_batches = self._dropped_rows = 0
        failed, self._failed_batches = self._failed_batches, 0
        start = utc_iso(self._window_start)
        document = {
            "schema": WINDOW_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.model_name,
            "version": self.version,
            "window_start": start,
            "window_end": utc_iso(self._window_end),
            "reference_id": self._reference.reference_id if self._reference else None,
            "batches": self._stats.batches,
            "rows": self._stats.rows,
            "dropped_batches": dropped_batches,
            "dropped_rows": dropped_rows,
            "failed_batches": failed,
            "features": self._stats.features(),
        }
        name = f"{self.model_name}-v{self.version}-{start.replace(':', '').replace('-', '')}-{self._file_tag}-{next(self._sequence):06d}.json"
        try:
            write_json_atomically(self.output_dir / name, document)
        except OSError:
            logger.exception("model '%s' version %d: could not write drift window %s", self.model_name,
                             self.version, self.output_dir / name)
