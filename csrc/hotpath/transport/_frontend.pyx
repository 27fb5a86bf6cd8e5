# cython: language_level=3
# distutils: language = c++
"""The native front end's Python face: a grpc++ server whose own threads take every call.

`NativeServer.drain()` hands over every event the gRPC threads queued since the last one, in one
call under one GIL acquisition: new calls with their first message, later stream messages, half-
closes and cancellations. `ServerCall.finish()` and `ServerCall.write()` post the answer for a gRPC
thread to send. Only the event loop's thread may use these objects.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector

EVENT_MESSAGE = 0
EVENT_HALF_CLOSE = 1
EVENT_CANCELLED = 2


cdef extern from "<grpcpp/grpcpp.h>" namespace "grpc" nogil:
    cppclass Slice:
        const unsigned char* begin()
        size_t size()

    cppclass Status:
        cbool ok()

    cppclass ByteBuffer:
        size_t Length()
        Status Dump(vector[Slice]* slices)


cdef extern from "hotpath/transport/frontend_core.h" namespace "hotpath" nogil:
    cppclass Call:
        const string& method()
        cbool streaming()
        int64_t deadline_ns()
        string metadata()
        string peer()
        string identities()
        void Unref()
        cbool py_owned
        void* py_handle

    cppclass Event:
        int kind
        Call* call
        ByteBuffer message

    cppclass Options:
        int max_message_bytes
        int threads
        int keepalive_time_ms
        int keepalive_timeout_ms
        int keepalive_min_ping_interval_ms
        int max_connection_age_ms
        vector[string] streaming_methods
        string tls_cert_path
        string tls_key_path
        string tls_client_ca_path
        int tls_reload_s

    cppclass Core:
        Core() except +
        int Start(const string& address, const Options& options, string* error) except +
        int event_fd()
        void Drain(vector[Event]* out)
        cbool PostWrite(Call* call, const char* data, size_t size)
        cbool PostFinish(Call* call, int code, const string& details, const char* data, size_t size, cbool has_response)
        void Wake()
        void Shutdown(double grace_s)
        void Close()


cdef bytes _message_bytes(ByteBuffer* buffer):
    cdef vector[Slice] slices
    cdef size_t total = buffer.Length(), offset = 0
    cdef Py_ssize_t i
    if not buffer.Dump(&slices).ok():
        raise RuntimeError("gRPC could not read a request message")
    if slices.size() == 1:
        return PyBytes_FromStringAndSize(<const char*>slices[0].begin(), slices[0].size())
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* target = PyBytes_AS_STRING(out)
    for i in range(<Py_ssize_t>slices.size()):
        memcpy(target + offset, slices[i].begin(), slices[i].size())
        offset += slices[i].size()
    return out


cdef dict _METHOD_NAMES = {}


@cython.final
@cython.freelist(256)
cdef class ServerCall:
    """One RPC as the gRPC threads delivered it; answer it once with `finish`.

    `on_cancel`, when set, is called (on the loop's thread, from `drain`) if the call ends before
    the server finished it: the client cancelled, its deadline passed or it went away.
    """

    cdef Call* _call
    cdef NativeServer _server
    cdef readonly str method
    cdef readonly long long deadline_ns
    """time.monotonic_ns() at which the caller's deadline passes; 0 when it set none."""
    cdef readonly bint streaming
    cdef readonly bint cancelled
    cdef readonly bint finished
    cdef public object on_cancel
    cdef public object on_message
    """For a streaming call: called with each later message (bytes), and with None at half-close."""

    @staticmethod
    cdef ServerCall new(NativeServer server, Call* call):
        cdef ServerCall self = ServerCall.__new__(ServerCall)
        cdef string raw = call.method()
        cdef bytes key = raw
        self._call = call
        self._server = server
        name = _METHOD_NAMES.get(key)
        if name is None:
            name = _METHOD_NAMES[key] = key.decode("utf-8", "replace")
        self.method = name
        self.deadline_ns = call.deadline_ns()
        self.streaming = call.streaming()
        call.py_owned = True
        # A borrowed pointer: __dealloc__ clears it before the Python object goes.
        call.py_handle = <void*>self
        return self

    def metadata(self) -> list:
        """The caller's metadata as (key, value) pairs: str values, bytes for `-bin` keys."""
        cdef bytes raw = self._call.metadata()
        parts = raw.split(b"\0")
        pairs = []
        for i in range(0, len(parts) - 1, 2):
            key = parts[i].decode("ascii", "replace")
            value = parts[i + 1]
            pairs.append((key, value if key.endswith("-bin") else value.decode("utf-8", "replace")))
        return pairs

    def peer(self) -> str:
        """The client's address as gRPC names it, e.g. "ipv4:127.0.0.1:50000"; for logs, not for trust."""
        cdef bytes raw = self._call.peer()
        return raw.decode("utf-8", "replace")

    def identities(self) -> list:
        """The common name and subject alternative names of the client certificate mutual TLS verified
        (DNS names, URIs, e-mail addresses, IP addresses as text); empty for a client not verified."""
        cdef bytes raw = self._call.identities()
        return [value.decode("utf-8", "replace") for value in raw.split(b"\0") if value]

    def write(self, bytes message) -> None:
        """Send one message on a streaming call (queued behind any still being written)."""
        if self.finished:
            return
        if self._server._core.PostWrite(self._call, PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message)):
            self._server._wake_soon()

    def finish(self, int code, str details="", bytes response=None) -> None:
        """End the call with a gRPC status code number, its message and, for unary OK, the response."""
        if self.finished:
            return
        self.finished = True
        cdef string text = details.encode("utf-8", "replace")
        cdef bint first
        if response is None:
            first = self._server._core.PostFinish(self._call, code, text, NULL, 0, False)
        else:
            first = self._server._core.PostFinish(self._call, code, text, PyBytes_AS_STRING(response),
                                                  PyBytes_GET_SIZE(response), True)
        if first:
            self._server._wake_soon()

    def __dealloc__(self):
        if self._call != NULL:
            self._call.py_handle = NULL
            self._call.Unref()
            self._call = NULL


@cython.final
cdef class NativeServer:
    """A grpc++ server over a generic service: every method arrives here as raw messages."""

    cdef Core* _core
    cdef vector[Event] _events
    cdef readonly int port
    cdef object _call_soon
    cdef object _wake

    def __cinit__(self):
        self._core = new Core()
        self._call_soon = None
        self._wake = self.wake

    cdef _wake_soon(self):
        # Answers given in one loop pass go out on one wake-up of the sender thread.
        if self._call_soon is None:
            self._core.Wake()
        else:
            self._call_soon(self._wake)

    def wake(self) -> None:
        """Have the sender thread send every answer given so far."""
        self._core.Wake()

    def start(self, str address, *, int max_message_bytes, int threads, streaming_methods,
              int keepalive_time_ms, int keepalive_timeout_ms, int keepalive_min_ping_interval_ms,
              int max_connection_age_ms=0, call_soon=None, str tls_cert_path="", str tls_key_path="",
              str tls_client_ca_path="", int tls_reload_s=60) -> int:
        """Listen on `address` and start the gRPC threads; returns the port, raises OSError when it cannot listen.

        `call_soon` is the event loop's: answers are sent once per loop pass (without it, at once).
        With `tls_cert_path` and `tls_key_path` (PEM files) the port speaks TLS only; with
        `tls_client_ca_path` too, clients must present a certificate that CA signed. gRPC re-reads
        the files every `tls_reload_s` seconds and, where they fail to parse, keeps the last good ones.
        """
        self._call_soon = call_soon
        cdef Options options
        cdef string error
        options.max_message_bytes = max_message_bytes
        options.threads = threads
        options.keepalive_time_ms = keepalive_time_ms
        options.keepalive_timeout_ms = keepalive_timeout_ms
        options.keepalive_min_ping_interval_ms = keepalive_min_ping_interval_ms
        options.max_connection_age_ms = max_connection_age_ms
        options.tls_cert_path = tls_cert_path.encode()
        options.tls_key_path = tls_key_path.encode()
        options.tls_client_ca_path = tls_client_ca_path.encode()
        options.tls_reload_s = tls_reload_s
        for method in streaming_methods:
            options.streaming_methods.push_back(method.encode())
        self.port = self._core.Start(address.encode(), options, &error)
        if self.port == 0:
            raise OSError(error.decode("utf-8", "replace"))
        return self.port

    def fileno(self) -> int:
        """An eventfd that turns readable when events wait to be drained."""
        return self._core.event_fd()

    def drain(self) -> list:
        """Every event queued since the last drain, in order, as (kind, ServerCall, message or None).

        A cancellation calls its call's `on_cancel` here and is not returned; events of calls whose
        ServerCall is gone are dropped.
        """
        cdef Event* event
        cdef Call* call
        cdef ServerCall handle
        cdef list out = []
        cdef size_t i
        self._core.Drain(&self._events)
        for i in range(self._events.size()):
            event = &self._events[i]
            call = event.call
            if call.py_handle != NULL:
                handle = <ServerCall>call.py_handle
                call.Unref()
            elif not call.py_owned and event.kind != EVENT_CANCELLED:
                handle = ServerCall.new(self, call)
            else:
                call.Unref()
                continue
            if event.kind == EVENT_CANCELLED:
                handle.cancelled = True
                handle.finished = True
                if handle.on_cancel is not None:
                    handle.on_cancel()
            elif event.kind == EVENT_MESSAGE:
                out.append((EVENT_MESSAGE, handle, _message_bytes(&event.message)))
            else:
                out.append((EVENT_HALF_CLOSE, handle, None))
        self._events.clear()
        return out

    def shutdown(self, double grace_s) -> None:
        """Stop accepting calls; wait up to grace_s for calls in flight (run this off the loop's thread)."""
        with nogil:  # blocks until in-flight calls finish, which needs the loop thread to run
            self._core.Shutdown(grace_s)

    def close(self) -> None:
        """After shutdown, on the loop's thread: stop the gRPC threads; no call may be answered after."""
        with nogil:  # joins the gRPC threads, which take no GIL but may take a moment to drain
            self._core.Close()

    def __dealloc__(self):
        del self._core
