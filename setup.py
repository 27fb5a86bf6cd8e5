"""Build hotpath's native extensions: every `csrc/hotpath/<name>.pyx` becomes `hotpath.<name>`.

Set HOTPATH_DEBUG=1 to build with line tracing, annotated HTML and the debug checks on.
"""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("HOTPATH_DEBUG") == "1"

extensions = [
    Extension(
        f"hotpath.{pyx.stem}",
        [str(pyx)],
        include_dirs=["csrc", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
        + ([("CYTHON_TRACE_NOGIL", "1"), ("HOTPATH_DEBUG", "1")] if DEBUG else []),
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    )
    for pyx in sorted(Path("csrc/hotpath").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={"linetrace": DEBUG, "boundscheck": DEBUG, "wraparound": DEBUG},
    )
)
