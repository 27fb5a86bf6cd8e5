"""matplotlib for the bench's and `hotpath tune`'s plots, or a one-line note when it is missing: the plots
are optional, the numbers they draw are also written as JSON and text."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType


def pyplot(path: Path) -> ModuleType | None:
    """matplotlib.pyplot on the file-only Agg backend; None, after saying so, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"plot skipped: matplotlib is not installed (pip install matplotlib to get {path.name})")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
