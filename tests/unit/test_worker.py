"""The thread a migration job runs on, started ahead (no KVM: plain functions)."""
import logging
import threading
import time

import pytest

from kvmfilter.migrate.worker import Worker


def test_submitted_functions_run_in_order_on_the_one_thread_started_ahead():
    worker = Worker("test-worker")
    started_ahead = worker.thread.ident
    assert started_ahead is not None and worker.thread.is_alive()
    ran = []
    done = threading.Event()
    for i in range(5):
        worker.submit(lambda i=i: ran.append((i, threading.get_ident())))
    worker.submit(done.set)
    assert done.wait(5)
    assert ran == [(i, started_ahead) for i in range(5)]
    assert started_ahead != threading.get_ident()
    worker.close()
    assert not worker.thread.is_alive()


def test_a_function_that_raises_is_logged_and_the_next_one_still_runs(caplog):
    worker = Worker("test-worker")
    done = threading.Event()

    def broken():
        raise RuntimeError("a job's bug")

    with caplog.at_level(logging.ERROR, logger="kvmfilter.migrate"):
        worker.submit(broken)
        worker.submit(done.set)
        assert done.wait(5), "the worker died with the first function"
    failed = [r for r in caplog.records if r.getMessage() == "worker_task_failed"]
    assert len(failed) == 1 and "a job's bug" in str(failed[0].exc_info[1])
    worker.close()


def test_close_lets_the_work_already_submitted_finish_and_refuses_more():
    worker = Worker("test-worker")
    gate, ran = threading.Event(), []
    worker.submit(gate.wait)
    worker.submit(lambda: ran.append("after"))
    threading.Timer(0.05, gate.set).start()
    worker.close(timeout=5)
    assert ran == ["after"] and not worker.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda: None)
    worker.close()  # again: nothing more to end


def test_nothing_is_taken_once_close_has_begun():
    worker = Worker("test-worker")
    gate = threading.Event()
    worker.submit(gate.wait)  # the thread is busy: close() queues its end behind this
    closer = threading.Thread(target=worker.close, kwargs={"timeout": 5})
    closer.start()
    deadline = time.monotonic() + 5
    while not worker._closed:  # until close() has begun; the thread still runs gate.wait
        assert time.monotonic() < deadline, "close() never began"
        time.sleep(0.001)
    assert worker.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda: None)
    gate.set()
    closer.join(5)
    assert not worker.thread.is_alive()
