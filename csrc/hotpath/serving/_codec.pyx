# cython: language_level=3
"""Native codec for the Open Inference Protocol's BYTES tensors (4-byte little-endian length, then bytes)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t
from libc.string cimport memcpy


class BytesFormatError(ValueError):
    """A BYTES buffer whose length prefixes do not add up."""


def split_bytes(const unsigned char[::1] buf, Py_ssize_t count) -> list:
    """Split a length-prefixed BYTES buffer into exactly `count` byte strings."""
    cdef Py_ssize_t pos = 0, n = buf.shape[0], i
    cdef uint32_t length
    cdef list out = []
    for i in range(count):
        if pos + 4 > n:
            raise BytesFormatError(f"element {i} of {count}: buffer ends at byte {n}, inside its 4-byte length prefix")
        # Widened before the shift: a byte shifted by 24 would overflow a (signed) int.
        length = buf[pos] | (buf[pos + 1] << 8) | (buf[pos + 2] << 16) | (<uint32_t>buf[pos + 3] << 24)
        pos += 4
        if pos + length > n:
            raise BytesFormatError(f"element {i} of {count}: length prefix says {length} bytes but only {n - pos} remain")
        # Same bytes, seen as char: PyBytes_FromStringAndSize copies `length` of them, all in bounds (checked above).
        out.append(PyBytes_FromStringAndSize(<const char*>&buf[pos], length))
        pos += length
    if pos != n:
        raise BytesFormatError(f"{n - pos} bytes left over after {count} elements")
    return out


def join_bytes(items) -> bytes:
    """Serialize byte strings (or str, encoded UTF-8) into one length-prefixed BYTES buffer."""
    cdef list encoded = [x.encode() if isinstance(x, str) else bytes(x) for x in items]
    cdef bytes item
    cdef Py_ssize_t total = 0, length
    for item in encoded:
        total += 4 + PyBytes_GET_SIZE(item)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dst = PyBytes_AS_STRING(out)
    for item in encoded:
        # An element fits the 4-byte prefix: gRPC caps a message, and so a BYTES element, at 2 GiB.
        length = PyBytes_GET_SIZE(item)
        dst[0] = length & 0xFF
        dst[1] = (length >> 8) & 0xFF
        dst[2] = (length >> 16) & 0xFF
        dst[3] = (length >> 24) & 0xFF
        memcpy(dst + 4, PyBytes_AS_STRING(item), length)
        dst += 4 + length
    return out
