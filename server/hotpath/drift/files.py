"""Writing drift files so readers never see half of one, and the timestamps they carry."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

PARTIAL_DIR = ".partial"
"""Subdirectory where files are written before being renamed into place; readers ignore it."""


def utc_iso(seconds: float) -> str:
    """A UTC timestamp as ISO 8601 with a `Z`, the form drift files use."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> float:
    """Seconds since the epoch from an ISO 8601 timestamp (UTC unless it says otherwise)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def write_json_atomically(path: Path, document: dict) -> None:
    """Write `document` as compact JSON, atomically."""
    write_text_atomically(path, json.dumps(document, separators=(",", ":")))


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` so that readers only ever see the whole file or nothing: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / PARTIAL_DIR
    partial.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=partial, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
