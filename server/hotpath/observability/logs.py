"""Logging set-up shared by the server's processes: one format, the process's role in every line."""

from __future__ import annotations

import logging


def configure_logging(level: str, role: str = "main") -> None:
    """Log to stderr at `level`, each line naming the process (main, worker-0, ...)."""
    logging.basicConfig(level=level, force=True,
                        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")
