"""Logging set-up shared by the server's processes: one format, the process's role in every line."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


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
