"""Generate the Python stubs for hotpath's protocol from the `.proto` files in this folder.

The one way stubs are made: `python proto/generate.py` rewrites both copies, the server's
(`server/hotpath/_proto/`) and the client package's (`clients/python/hotpath_client/_proto/`), so the
client installs without the server; the test suite regenerates into a temporary folder to fail when
either committed copy is stale.

Each copy registers its files in its own descriptor pool rather than protobuf's default one:
Triton's client registers the same `inference` package in the default pool, and a process must be
able to import both (tests, and users who mix clients).

Run it with GENERATOR installed (in a venv of its own: it needs protobuf 6): its protoc writes
gencode 6.31.1, which protobuf's cross-version guarantee lets every runtime from 6.31.1 through 7.x
load, so hotpath installs beside Triton's current client (protobuf<7) and beside protobuf 7 alike.
A newer grpcio-tools writes gencode that protobuf 6 refuses at import.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

GENERATOR = "grpcio-tools==1.76.0"
GENCODE_MAJOR = 6
PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("model_config.proto", "grpc_service.proto", "evaluation.proto")
TARGETS = (
    PROTO_DIR.parent / "server" / "hotpath" / "_proto",
    PROTO_DIR.parent / "clients" / "python" / "hotpath_client" / "_proto",
)

PACKAGE_INIT = '''"""Stubs generated from proto/ by proto/generate.py; do not edit."""

import warnings

# The stubs are protobuf 6 gencode, which protobuf 7 loads by its cross-version guarantee but warns
# about once per file; the package's requirement (protobuf<8) keeps every runtime it allows in range.
warnings.filterwarnings("ignore", message=r"Protobuf gencode version 6\\.", category=UserWarning)
'''

POOL_MODULE = '''"""hotpath's own descriptor pool: the generated stubs register their files here."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


def _rewrite(text: str) -> str:
    text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
    if "_descriptor_pool.Default()" in text:
        text = text.replace("_descriptor_pool.Default()", "_pool.POOL")
        text = text.replace("# @@protoc_insertion_point(imports)", "from . import _pool\n# @@protoc_insertion_point(imports)", 1)
    return text


def check_generator() -> None:
    """Exit with what to install unless the protobuf beside grpc_tools writes the gencode hotpath ships."""
    from google.protobuf import __version__ as protobuf_version

    if int(protobuf_version.split(".")[0]) != GENCODE_MAJOR:
        raise SystemExit(f"proto/generate.py writes protobuf {GENCODE_MAJOR} gencode, but this environment has protobuf "
                         f"{protobuf_version}: run it from a venv with `pip install '{GENERATOR}'`")


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs into `out_dir` and return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={raw}",
             f"--grpc_python_out={raw}", f"--pyi_out={raw}", *(str(PROTO_DIR / f) for f in PROTO_FILES)],
            check=True,
        )
        written = []
        for path in sorted(Path(raw).iterdir()):
            if path.name == "model_config_pb2_grpc.py":
                continue
            target = out_dir / path.name
            target.write_text(_rewrite(path.read_text()))
            written.append(target)
    for name, text in (("_pool.py", POOL_MODULE), ("__init__.py", PACKAGE_INIT)):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, action="append",
                        help="folder to write the stubs into (repeatable; default: the server's and the client's copies)")
    args = parser.parse_args()
    check_generator()
    for out_dir in args.out or TARGETS:
        for path in generate(out_dir):
            print(path)


if __name__ == "__main__":
    main()
