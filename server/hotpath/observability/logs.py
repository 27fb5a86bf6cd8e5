"""Logging set-up shared by the server's processes: one format, the process's role in every line."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone

MAX_THROTTLE_KEYS = 10_000
"""Distinct keys a ThrottledLog remembers before it starts afresh, so random keys cannot grow it without bound."""


def configure_logging(level: str, role: str = "main", log_format: str = "text") -> None:
    """Log to stderr at `level`, each line naming the process (main, worker-0, ...); `log_format` "json"
    writes one JSON object per line instead, for log collectors (Kubernetes, Loki, Cloud Logging)."""
    logging.basicConfig(level=level, force=True,
                        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter(role))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `time` (UTC, RFC 3339), `level`, `role`, `logger`, `message`, and
    `exception` with the traceback when there is one."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds"),
                "level": record.levelname, "role": self._role, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class ThrottledLog:
    """Logs a request-triggered message at most once per `interval_s` per key, counting what it held back.

    Any client can make the server fail requests as fast as it sends them; one line per failure would
    let it flood the log. Each line that does go out says how many like it were suppressed since.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[object, tuple[float, int]] = {}

    def log(self, level: int, key: object, message: str, *args: object, exc_info: BaseException | None = None) -> None:
        """Log `message % args` (with `exc_info`'s traceback) under `key` unless a line for `key` went out within the interval."""
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < self._interval_s:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) >= MAX_THROTTLE_KEYS:
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            message += f" ({suppressed} more like it in the last {now - last:.0f} s)"
        self._logger.log(level, message, *args, exc_info=exc_info)
