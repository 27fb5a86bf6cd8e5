# cython: language_level=3
"""The dynamic batching queue: the per-request part of the hot path, compiled.

Requests wait in arrival order. The caller asks for a batch only when a replica is free to run
it. Under the work-conserving policy (the default) a batch is then ready at once: requests gather
only while every replica is busy. Under the delay policy (Triton's) a batch is ready when the
queued rows reach the largest preferred batch size (else `max_rows`) or when the oldest request has
waited the maximum delay. Either way a batch takes up to `max_rows` rows.
`pop_batch` takes requests from the head whose non-batch dims match the head's, never reorders the
ones that stay, and drops requests that were cancelled or whose deadline passed, failing the
latter. `deliver` hands each caller exactly its own rows of the batch's outputs as views.

Everything here runs on the event loop's thread; nothing is locked.
"""

cimport cython
from libc.errno cimport EAGAIN, errno

from collections import deque
from os import strerror

from hotpath.errors import DeadlineExceeded, QueueFull

READY_FULL = "full"
READY_DELAY = "delay"
READY_IDLE = "idle"


@cython.final
@cython.freelist(256)
cdef class Pending:
    """One queued request: its future, its decoded inputs, when it must have started, its trace span, and the id
    the prediction log records it under (None when it is not logged).

    Only `BatchQueue.push` makes one (through `Pending.new`); Python code reads its fields.
    """

    cdef readonly object future
    cdef readonly tuple inputs
    cdef readonly Py_ssize_t rows
    cdef readonly object key
    cdef readonly long long enqueued_ns
    cdef readonly long long deadline_ns
    cdef readonly object span
    cdef readonly object log_id

    def __init__(self):
        raise TypeError("Pending is not constructible from Python; BatchQueue.push creates it")

    @staticmethod
    cdef Pending new(object future, tuple inputs, Py_ssize_t rows, object key,
                     long long enqueued_ns, long long deadline_ns, object span, object log_id):
        # __new__ skips __init__, which exists only to refuse construction from Python.
        cdef Pending p = Pending.__new__(Pending)
        p.future = future
        p.inputs = inputs
        p.rows = rows
        p.key = key
        p.enqueued_ns = enqueued_ns
        p.deadline_ns = deadline_ns
        p.span = span
        p.log_id = log_id
        return p


@cython.final
cdef class BatchQueue:
    """A bounded FIFO of pending requests that forms batches; see the module docstring.

    `work_conserving=False` selects the delay policy, the only one that reads `max_delay_ns`.
    """

    cdef object _items
    cdef Py_ssize_t _rows
    cdef readonly Py_ssize_t max_rows
    cdef readonly Py_ssize_t max_requests
    cdef readonly Py_ssize_t max_queue_size
    cdef readonly long long max_delay_ns
    cdef readonly long long timeout_ns
    cdef readonly bint allow_timeout_override
    cdef readonly bint work_conserving
    cdef Py_ssize_t _full_rows

    def __init__(self, Py_ssize_t max_rows, Py_ssize_t max_queue_size, long long max_delay_ns=0,
                 preferred_sizes=(), bint batching=True, long long timeout_ns=0,
                 bint allow_timeout_override=True, bint work_conserving=True):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self._items = deque()
        self._rows = 0
        self.max_rows = max_rows
        self.max_requests = max_rows if batching else 1
        self.max_queue_size = max_queue_size
        self.max_delay_ns = max_delay_ns
        self.timeout_ns = timeout_ns
        self.allow_timeout_override = allow_timeout_override
        self.work_conserving = work_conserving
        self._full_rows = max([s for s in preferred_sizes if 0 < s <= max_rows], default=max_rows)

    def __len__(self):
        return len(self._items)

    @property
    def rows(self) -> int:
        """Rows waiting, over every queued request."""
        return self._rows

    def push(self, future, tuple inputs, Py_ssize_t rows, key, long long now_ns,
             long long deadline_ns=0, span=None, log_id=None):
        """Queue a request, or raise QueueFull at once when the queue holds max_queue_size requests.

        `deadline_ns` is the caller's own deadline (0: none). A queue policy timeout, when set,
        replaces it; where overrides are allowed, an earlier caller deadline still wins. `span` is
        the request's trace span when it is sampled, else None; `log_id` the id the prediction log
        records it under, else None.
        """
        if len(self._items) >= self.max_queue_size:
            raise QueueFull(f"queue is full ({self.max_queue_size} requests waiting); retry later")
        cdef long long policy_deadline = now_ns + self.timeout_ns if self.timeout_ns else 0
        if deadline_ns == 0 or (policy_deadline and not self.allow_timeout_override):
            deadline_ns = policy_deadline
        elif policy_deadline:
            deadline_ns = min(deadline_ns, policy_deadline)
        self._items.append(Pending.new(future, inputs, rows, key, now_ns, deadline_ns, span, log_id))
        self._rows += rows

    def ready_in(self, long long now_ns, bint busy=False) -> int:
        """-1 when empty, 0 when a batch is ready now, else nanoseconds until the oldest's delay ends.

        `busy` says whether a batch of this model is running. Under the work-conserving policy a
        queued request is ready at once while none is (nobody else will come to fill its batch
        sooner than the model can start); while one runs, requests gather as under the delay rule,
        so the next batch is fuller.
        """
        if not self._items:
            return -1
        if (self.work_conserving and not busy) or self._full():
            return 0
        cdef Pending head = self._items[0]
        cdef long long waited = now_ns - head.enqueued_ns
        return 0 if waited >= self.max_delay_ns else self.max_delay_ns - waited

    cdef inline bint _full(self):
        return self.max_requests == 1 or self._rows >= self._full_rows

    def ready_reason(self, bint busy=False) -> str:
        """Why a batch is ready now: READY_FULL when the queue holds a full batch, else READY_IDLE
        (work-conserving, and nothing of the model was running) or READY_DELAY (the oldest request
        waited the delay)."""
        if self._full():
            return READY_FULL
        return READY_IDLE if self.work_conserving and not busy else READY_DELAY

    cdef bint _expired(self, Pending p, long long now_ns):
        return p.deadline_ns != 0 and now_ns >= p.deadline_ns

    def pop_batch(self, long long now_ns):
        """Take the next batch: a list of Pending whose rows fit max_rows and whose keys match.

        Cancelled requests are skipped and expired ones failed with DEADLINE_EXCEEDED; both leave
        the queue. The list may be empty when every request at the head was dropped.
        """
        cdef list batch = []
        cdef list skipped = []
        cdef Py_ssize_t rows = 0, n = len(self._items)
        cdef Pending p
        cdef object key = None
        cdef object items = self._items
        cdef object popleft = items.popleft
        while n > 0 and len(batch) < self.max_requests:
            p = items[0]
            if p.future.done():
                popleft()
                self._rows -= p.rows
                n -= 1
                continue
            if self._expired(p, now_ns):
                popleft()
                self._rows -= p.rows
                n -= 1
                p.future.set_exception(DeadlineExceeded(
                    f"request waited {(now_ns - p.enqueued_ns) / 1e6:.3f} ms in the queue and its deadline passed before it could run"))
                continue
            if batch and p.key != key:
                skipped.append(popleft())
                n -= 1
                continue
            if batch and rows + p.rows > self.max_rows:
                break
            popleft()
            n -= 1
            self._rows -= p.rows
            if not batch:
                key = p.key
            batch.append(p)
            rows += p.rows
        if skipped:
            items.extendleft(reversed(skipped))
        return batch


def deliver(list batch, list outputs) -> None:
    """Give each request in `batch` its own rows of `outputs` (a list of arrays), as views."""
    cdef Py_ssize_t start = 0, stop
    cdef Pending p
    if len(batch) == 1:
        p = batch[0]
        if not p.future.done():
            p.future.set_result(outputs)
        return
    for p in batch:
        stop = start + p.rows
        if not p.future.done():
            p.future.set_result([out[start:stop] for out in outputs])
        start = stop


def fail(list batch, exc: BaseException) -> None:
    """Fail every still-waiting request of `batch` with `exc`."""
    cdef Pending p
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)


cdef extern from "<sys/timerfd.h>":
    struct timespec:
        long tv_sec
        long tv_nsec
    struct itimerspec:
        timespec it_interval
        timespec it_value
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec* new_value, itimerspec* old_value)
    int TFD_NONBLOCK, TFD_CLOEXEC, TFD_TIMER_ABSTIME

cdef extern from "<time.h>":
    int CLOCK_MONOTONIC

cdef extern from "<unistd.h>":
    ssize_t read(int fd, void* buf, size_t count) nogil
    int close(int fd)


cdef int _raise_errno() except -1:
    """Raise OSError(errno, strerror) for the C call that just failed (call it before anything else can set errno)."""
    cdef int code = errno
    raise OSError(code, strerror(code))


@cython.final
cdef class DeadlineTimer:
    """A timer file descriptor on the monotonic clock, for the event loop to wait on.

    asyncio's timers sleep in epoll, whose timeout is whole milliseconds; a queue delay of 100 us
    would become a millisecond. A timerfd in the loop's reader set wakes it to the nanosecond.
    Deadlines are `time.monotonic_ns()` values.
    """

    cdef int fd

    def __cinit__(self):
        self.fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.fd < 0:
            _raise_errno()

    def fileno(self) -> int:
        return self.fd

    def arm(self, long long deadline_ns) -> None:
        """Fire once at `deadline_ns` (a deadline in the past fires at once)."""
        cdef itimerspec spec
        spec.it_interval.tv_sec = 0
        spec.it_interval.tv_nsec = 0
        spec.it_value.tv_sec = deadline_ns // 1000000000
        spec.it_value.tv_nsec = deadline_ns % 1000000000
        if spec.it_value.tv_sec == 0 and spec.it_value.tv_nsec == 0:
            spec.it_value.tv_nsec = 1
        if timerfd_settime(self.fd, TFD_TIMER_ABSTIME, &spec, NULL) < 0:
            _raise_errno()

    def clear(self) -> None:
        """Consume a firing so the descriptor stops being readable."""
        cdef unsigned long long expirations
        # EAGAIN: the timer has not fired since the last read (the descriptor is non-blocking);
        # there is nothing to consume, so that is fine.
        if read(self.fd, &expirations, sizeof(expirations)) < 0 and errno != EAGAIN:
            _raise_errno()

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
