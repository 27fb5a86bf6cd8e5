"""Build hotpath's native extensions: every `csrc/hotpath/<package>/<name>.pyx` becomes `hotpath.<package>.<name>`.

`_frontend` is C++ over Debian's (or any distribution's) gRPC C++ library, found with pkg-config.
Set HOTPATH_DEBUG=1 to build with line tracing, annotated HTML and the debug checks on.
"""

import os
import shlex
import subprocess
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("HOTPATH_DEBUG") == "1"

NATIVE_SOURCES = {"hotpath.transport._frontend": ["csrc/hotpath/transport/frontend_core.cc"]}
"""C++ sources compiled into an extension beside its .pyx; these link gRPC C++."""


def grpc_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags of gRPC C++ from pkg-config, or a message saying what to install."""
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", "grpc++"], check=True, capture_output=True, text=True).stdout
        libs = subprocess.run(["pkg-config", "--libs", "grpc++"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit("hotpath's native front end needs gRPC C++ and pkg-config: "
                         "apt-get install libgrpc++-dev pkg-config (Debian/Ubuntu), then install hotpath again") from None
    return shlex.split(cflags), shlex.split(libs)


def extension(pyx: Path) -> Extension:
    name = ".".join(pyx.relative_to("csrc").with_suffix("").parts)
    optimise = ["-O0", "-g"] if DEBUG else ["-O3"]
    sources = NATIVE_SOURCES.get(name, [])
    cflags, libs = grpc_flags() if sources else ([], [])
    return Extension(
        name,
        [str(pyx), *sources],
        include_dirs=["csrc", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
        + ([("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []),
        extra_compile_args=optimise + (["-std=c++17", *cflags] if sources else []),
        extra_link_args=libs,
        language="c++" if sources else None,
    )


extensions = [extension(pyx) for pyx in sorted(Path("csrc/hotpath").glob("*/*.pyx"))]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={"linetrace": DEBUG, "boundscheck": DEBUG, "wraparound": DEBUG},
    )
)
