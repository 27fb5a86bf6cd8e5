"""The batching queue's rules, checked on the compiled queue and on the plain-Python reference alike."""

from __future__ import annotations

import asyncio
import errno
import itertools
import random
import select
import time

import numpy as np
import pytest

import batch_reference
from hotpath.errors import DeadlineExceeded, QueueFull
from hotpath.serving import _batcher

MS = 1_000_000


class QueueBehaviour:
    """Every rule of the queue; subclasses name the module (`_batcher` or the reference) under test."""

    impl = None

    @pytest.fixture(autouse=True)
    def _loop(self):
        self.loop = asyncio.new_event_loop()
        yield
        self.loop.close()

    def queue(self, max_rows: int = 8, max_queue_size: int = 64, **kwargs):
        return self.impl.BatchQueue(max_rows, max_queue_size, **kwargs)

    def push(self, queue, rows: int = 1, key: object = None, now_ns: int = 0, deadline_ns: int = 0, value: float = 0.0):
        future = self.loop.create_future()
        queue.push(future, (np.full((rows, 2), value, np.float32),), rows, key, now_ns, deadline_ns)
        return future

    def test_rejects_bad_limits(self):
        with pytest.raises(ValueError, match="max_rows"):
            self.queue(max_rows=0)
        with pytest.raises(ValueError, match="max_queue_size"):
            self.queue(max_queue_size=0)

    def test_batches_in_arrival_order(self):
        q = self.queue()
        futures = [self.push(q, value=i) for i in range(5)]
        batch = q.pop_batch(0)
        assert [p.future for p in batch] == futures
        assert [p.inputs[0][0, 0] for p in batch] == [0, 1, 2, 3, 4]
        assert len(q) == 0 and q.rows == 0 and q.ready_in(0) == -1

    def test_rows_of_multi_row_requests_count_toward_max_rows(self):
        q = self.queue(max_rows=8)
        for rows in (3, 4, 2, 1, 8):
            self.push(q, rows=rows)
        assert q.rows == 18
        assert [p.rows for p in q.pop_batch(0)] == [3, 4]
        assert [p.rows for p in q.pop_batch(0)] == [2, 1]
        assert [p.rows for p in q.pop_batch(0)] == [8]
        assert q.rows == 0

    def test_batching_off_takes_one_request_per_batch(self):
        q = self.queue(batching=False, max_delay_ns=10 * MS)
        for _ in range(3):
            self.push(q)
        assert q.max_requests == 1
        assert q.ready_in(0) == 0
        assert [len(q.pop_batch(0)) for _ in range(3)] == [1, 1, 1]

    def test_different_keys_never_share_a_batch_and_keep_their_order(self):
        q = self.queue()
        keys = ["a", "b", "a", "b", "c", "a"]
        futures = [self.push(q, key=k) for k in keys]
        first = q.pop_batch(0)
        assert [p.key for p in first] == ["a", "a", "a"]
        assert [p.future for p in first] == [futures[0], futures[2], futures[5]]
        second = q.pop_batch(0)
        assert [p.future for p in second] == [futures[1], futures[3]]
        assert [p.future for p in q.pop_batch(0)] == [futures[4]]

    def test_a_request_that_does_not_fit_stops_the_batch_without_reordering(self):
        q = self.queue(max_rows=4)
        first, big, small = self.push(q, rows=2), self.push(q, rows=3), self.push(q, rows=1)
        assert [p.future for p in q.pop_batch(0)] == [first]
        assert [p.future for p in q.pop_batch(0)] == [big, small]

    def test_ready_in_waits_for_the_oldest_request_delay(self):
        q = self.queue(max_rows=8, max_delay_ns=10 * MS, work_conserving=False)
        assert q.ready_in(0) == -1
        self.push(q, now_ns=100 * MS)
        self.push(q, now_ns=104 * MS)
        assert q.ready_in(100 * MS) == 10 * MS
        assert q.ready_in(106 * MS) == 4 * MS
        assert q.ready_in(110 * MS) == 0 and q.ready_reason() == self.impl.READY_DELAY
        assert q.ready_in(200 * MS) == 0

    def test_ready_at_once_when_rows_reach_max_rows(self):
        q = self.queue(max_rows=4, max_delay_ns=10 * MS, work_conserving=False)
        self.push(q, rows=3)
        assert q.ready_in(0) == 10 * MS
        self.push(q, rows=1)
        assert q.ready_in(0) == 0 and q.ready_reason() == self.impl.READY_FULL

    def test_ready_at_once_when_rows_reach_the_largest_preferred_size(self):
        q = self.queue(max_rows=16, max_delay_ns=10 * MS, preferred_sizes=(2, 4, 32), work_conserving=False)
        for _ in range(3):
            self.push(q)
        assert q.ready_in(0) == 10 * MS
        self.push(q)
        assert q.ready_in(0) == 0

    def test_zero_delay_is_ready_at_once(self):
        q = self.queue(work_conserving=False)
        self.push(q, now_ns=5 * MS)
        assert q.ready_in(5 * MS) == 0

    def test_work_conserving_is_the_default_and_ready_at_once_whatever_the_delay(self):
        q = self.queue(max_rows=4, max_delay_ns=10 * MS)
        assert q.work_conserving
        assert q.ready_in(0) == -1
        self.push(q, now_ns=100 * MS)
        assert q.ready_in(100 * MS) == 0 and q.ready_reason() == self.impl.READY_IDLE
        self.push(q, rows=3, now_ns=100 * MS)
        assert q.ready_in(100 * MS) == 0 and q.ready_reason() == self.impl.READY_FULL

    def test_work_conserving_batches_take_what_gathered_up_to_max_rows(self):
        q = self.queue(max_rows=4, max_delay_ns=10 * MS)
        for _ in range(6):
            self.push(q)
        assert [len(q.pop_batch(0)), len(q.pop_batch(0))] == [4, 2]
        assert q.ready_in(0) == -1

    def test_cancelled_requests_are_skipped(self):
        q = self.queue()
        futures = [self.push(q, value=i) for i in range(4)]
        futures[0].cancel()
        futures[2].cancel()
        batch = q.pop_batch(0)
        assert [p.future for p in batch] == [futures[1], futures[3]]
        assert q.rows == 0

    def test_only_cancelled_requests_give_an_empty_batch_and_an_empty_queue(self):
        q = self.queue()
        for future in [self.push(q) for _ in range(3)]:
            future.cancel()
        assert q.pop_batch(0) == []
        assert len(q) == 0 and q.ready_in(0) == -1

    def test_expired_requests_fail_with_deadline_exceeded(self):
        q = self.queue()
        late = self.push(q, now_ns=0, deadline_ns=5 * MS)
        on_time = self.push(q, now_ns=0, deadline_ns=50 * MS)
        endless = self.push(q, now_ns=0)
        batch = q.pop_batch(10 * MS)
        assert [p.future for p in batch] == [on_time, endless]
        with pytest.raises(DeadlineExceeded, match="waited 10.000 ms in the queue"):
            late.result()
        assert DeadlineExceeded.code.name == "DEADLINE_EXCEEDED"

    def test_a_deadline_reached_exactly_has_passed(self):
        q = self.queue()
        future = self.push(q, now_ns=0, deadline_ns=5 * MS)
        assert q.pop_batch(5 * MS) == []
        assert isinstance(future.exception(), DeadlineExceeded)

    def test_policy_timeout_applies_when_the_caller_sets_no_deadline(self):
        q = self.queue(timeout_ns=20 * MS)
        self.push(q, now_ns=10 * MS)
        assert q.pop_batch(29 * MS)[0].deadline_ns == 30 * MS

    def test_override_lets_an_earlier_caller_deadline_shorten_the_policy_timeout(self):
        q = self.queue(timeout_ns=20 * MS, allow_timeout_override=True)
        self.push(q, now_ns=0, deadline_ns=5 * MS)
        self.push(q, now_ns=0, deadline_ns=100 * MS)
        assert [p.deadline_ns for p in q.pop_batch(0)] == [5 * MS, 20 * MS]

    def test_without_override_the_policy_timeout_replaces_the_caller_deadline(self):
        q = self.queue(timeout_ns=20 * MS, allow_timeout_override=False)
        self.push(q, now_ns=0, deadline_ns=5 * MS)
        self.push(q, now_ns=0, deadline_ns=100 * MS)
        assert [p.deadline_ns for p in q.pop_batch(0)] == [20 * MS, 20 * MS]

    def test_without_a_policy_timeout_the_caller_deadline_stands(self):
        q = self.queue(timeout_ns=0, allow_timeout_override=False)
        self.push(q, now_ns=0, deadline_ns=5 * MS)
        self.push(q, now_ns=0)
        assert [p.deadline_ns for p in q.pop_batch(0)] == [5 * MS, 0]

    def test_full_queue_raises_queue_full_at_once(self):
        q = self.queue(max_queue_size=2)
        self.push(q)
        self.push(q)
        with pytest.raises(QueueFull, match=r"queue is full \(2 requests waiting\)"):
            self.push(q)
        assert len(q) == 2
        q.pop_batch(0)
        self.push(q)

    def test_deliver_gives_each_caller_its_own_rows_as_views(self):
        q = self.queue()
        futures = [self.push(q, rows=r) for r in (1, 3, 2)]
        batch = q.pop_batch(0)
        outputs = [np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6, dtype=np.int64)]
        self.impl.deliver(batch, outputs)
        results = [f.result() for f in futures]
        np.testing.assert_array_equal(results[0][1], [0])
        np.testing.assert_array_equal(results[1][1], [1, 2, 3])
        np.testing.assert_array_equal(results[2][1], [4, 5])
        np.testing.assert_array_equal(results[1][0], [[2, 3], [4, 5], [6, 7]])
        for result in results:
            assert all(np.shares_memory(part, whole) for part, whole in zip(result, outputs))

    def test_deliver_hands_a_lone_request_the_outputs_themselves(self):
        q = self.queue()
        future = self.push(q, rows=2)
        outputs = [np.zeros((2, 2), np.float32)]
        self.impl.deliver(q.pop_batch(0), outputs)
        assert future.result()[0] is outputs[0]

    def test_deliver_skips_callers_that_went_away(self):
        q = self.queue()
        gone, waiting = self.push(q), self.push(q)
        batch = q.pop_batch(0)
        gone.cancel()
        self.impl.deliver(batch, [np.array([[1.0], [2.0]])])
        assert gone.cancelled()
        np.testing.assert_array_equal(waiting.result()[0], [[2.0]])

    def test_fail_fails_only_waiting_requests(self):
        q = self.queue()
        gone, waiting = self.push(q), self.push(q)
        batch = q.pop_batch(0)
        gone.cancel()
        error = RuntimeError("replica broke")
        self.impl.fail(batch, error)
        assert gone.cancelled()
        assert waiting.exception() is error

    def test_a_pending_keeps_the_span_it_was_pushed_with(self):
        q = self.queue()
        span = object()
        q.push(self.loop.create_future(), (np.zeros((1, 2), np.float32),), 1, None, 0, span=span)
        self.push(q)
        assert [p.span for p in q.pop_batch(0)] == [span, None]

    def test_a_pending_keeps_the_log_id_it_was_pushed_with(self):
        q = self.queue()
        q.push(self.loop.create_future(), (np.zeros((1, 2), np.float32),), 1, None, 0, log_id="req-7")
        self.push(q)
        assert [p.log_id for p in q.pop_batch(0)] == ["req-7", None]


class TestNativeQueue(QueueBehaviour):
    impl = _batcher


class TestReferenceQueue(QueueBehaviour):
    impl = batch_reference


def _outcome(future: asyncio.Future) -> object:
    if not future.done():
        return "waiting"
    if future.cancelled():
        return "cancelled"
    if future.exception() is not None:
        return type(future.exception()).__name__
    return [a.tolist() for a in future.result()]


DIFFERENTIAL_CONFIGS = [
    dict(max_rows=6, max_queue_size=12, max_delay_ns=2 * MS, preferred_sizes=preferred, batching=batching,
         timeout_ns=timeout, allow_timeout_override=override, work_conserving=conserving)
    for preferred, batching, timeout, override, conserving in itertools.product(
        ((), (2, 3, 64)), (True, False), (0, 5 * MS), (True, False), (True, False))
] + [dict(max_rows=1, max_queue_size=3), dict(max_rows=16, max_queue_size=64, preferred_sizes=(4,)),
     dict(max_rows=16, max_queue_size=64, preferred_sizes=(4,), max_delay_ns=MS, work_conserving=False)]


@pytest.mark.parametrize("seed", range(len(DIFFERENTIAL_CONFIGS)))
def test_native_queue_matches_the_reference(seed: int) -> None:
    """Random pushes, cancellations, waits and pops give the same batches, deadlines and outcomes."""
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    options = DIFFERENTIAL_CONFIGS[seed]
    queues = (_batcher.BatchQueue(**options), batch_reference.BatchQueue(**options))
    modules = (_batcher, batch_reference)
    futures: tuple[list, list] = ([], [])
    unsettled: list[int] = []
    now = 0
    try:
        for step in range(2000):
            op = rng.random()
            if op < 0.45:
                rows = rng.randint(1, options["max_rows"])
                key = rng.choice(["a", "b"])
                deadline = rng.choice([0, now + rng.randint(0, 8) * MS])
                raised = []
                for queue, made in zip(queues, futures):
                    future = loop.create_future()
                    try:
                        queue.push(future, (np.full((rows, 1), step, np.int64),), rows, key, now, deadline)
                    except QueueFull:
                        raised.append(True)
                        continue
                    raised.append(False)
                    made.append(future)
                assert raised[0] == raised[1], f"step {step}: push"
                if not raised[0]:
                    unsettled.append(len(futures[0]) - 1)
            elif op < 0.55:
                if unsettled:
                    i = rng.choice(unsettled)
                    futures[0][i].cancel()
                    futures[1][i].cancel()
            elif op < 0.7:
                now += rng.randint(0, 3) * MS
            else:
                batches = [queue.pop_batch(now) for queue in queues]
                assert [(p.rows, p.key, p.deadline_ns, p.enqueued_ns) for p in batches[0]] == \
                       [(p.rows, p.key, p.deadline_ns, p.enqueued_ns) for p in batches[1]], f"step {step}: pop_batch"
                failed = rng.random() < 0.1
                for module, batch in zip(modules, batches):
                    if failed:
                        module.fail(batch, RuntimeError("replica failed"))
                    elif batch:
                        rows = sum(p.rows for p in batch)
                        module.deliver(batch, [np.concatenate([p.inputs[0] for p in batch]) * 10, np.arange(rows)])
            assert (len(queues[0]), queues[0].rows) == (len(queues[1]), queues[1].rows), f"step {step}: size"
            assert queues[0].ready_in(now) == queues[1].ready_in(now), f"step {step}: ready_in"
            if len(queues[0]):
                assert queues[0].ready_reason() == queues[1].ready_reason(), f"step {step}: ready_reason"
            outcomes = [(_outcome(futures[0][i]), _outcome(futures[1][i])) for i in unsettled]
            assert all(a == b for a, b in outcomes), f"step {step}: outcomes {outcomes}"
            unsettled = [i for i, (a, _) in zip(unsettled, outcomes) if a == "waiting"]
        while len(queues[0]) or len(queues[1]):
            batches = [queue.pop_batch(now) for queue in queues]
            assert [(p.rows, p.key, p.deadline_ns) for p in batches[0]] == \
                   [(p.rows, p.key, p.deadline_ns) for p in batches[1]], "the rest of the queue"
    finally:
        loop.close()


def test_deadline_timer_fires_at_its_deadline_and_clears() -> None:
    timer = _batcher.DeadlineTimer()
    try:
        start = time.monotonic_ns()
        timer.arm(start + 20 * MS)
        assert select.select([timer], [], [], 0)[0] == []
        assert select.select([timer], [], [], 1.0)[0] == [timer]
        assert time.monotonic_ns() - start >= 20 * MS
        timer.clear()
        assert select.select([timer], [], [], 0)[0] == []
        timer.arm(start)
        assert select.select([timer], [], [], 0.5)[0] == [timer]
        timer.arm(time.monotonic_ns() + 10_000 * MS)
        assert select.select([timer], [], [], 0.05)[0] == [], "re-arming must drop a firing not yet read"
        timer.clear()  # nothing fired: read() says EAGAIN, which is not an error
    finally:
        timer.close()
    timer.close()


def test_deadline_timer_raises_the_real_errno() -> None:
    timer = _batcher.DeadlineTimer()
    try:
        with pytest.raises(OSError) as invalid:
            timer.arm(-5 * 1_000_000_000)
        assert invalid.value.errno == errno.EINVAL and invalid.value.strerror == "Invalid argument"
    finally:
        timer.close()
    for call in (lambda: timer.arm(time.monotonic_ns()), timer.clear):
        with pytest.raises(OSError) as closed:
            call()
        assert closed.value.errno == errno.EBADF


def test_pending_is_not_constructible_from_python() -> None:
    with pytest.raises(TypeError, match="not constructible from Python"):
        _batcher.Pending()
