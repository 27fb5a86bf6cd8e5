"""hotpath's benchmark harness: models, a naive reference server, the ORT ceiling and the load generator.

The bench runs from a hotpath checkout, next to the client package whose request builder the load
generator uses: when `hotpath_client` is not installed, the checkout's `clients/python` is imported.
"""

import importlib.util
import sys
from pathlib import Path

_CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "python"
if importlib.util.find_spec("hotpath_client") is None and _CLIENT_DIR.is_dir():
    sys.path.append(str(_CLIENT_DIR))
