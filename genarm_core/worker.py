"""The one thread that runs the model work of every engine in the process.

Why one: torch's CPU kernels run on an OpenMP thread team owned by the calling thread. Two
calling threads means two teams, more threads than cores, and GNU OpenMP then stops its workers
spinning between parallel regions; every one of a decode step's ~600 small regions then pays a
wake-up. Measured on a 2-core EPYC: one SmolLM2 decode step 39 ms from the thread that loaded the
model, 65 ms from a second thread. So loading, prefill, decoding and scoring all run here, and
other threads (a web server's, a test's) hand work over with `call`.

The thread runs jobs (`call`) and steps every scheduler that has work, round-robin; it sleeps
when there is nothing to do.
"""
from __future__ import annotations

import atexit
import threading
from collections import deque


class _Job:
    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.result = self.error = None


class Worker:
    def __init__(self):
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._busy: list = []  # schedulers with work, stepped in turn
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="genarm-worker", daemon=True)
            self._thread.start()

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn, *args, **kwargs):
        """Runs fn on the worker thread and returns its result (raises its exception)."""
        if self.on_worker():
            return fn(*args, **kwargs)
        job = _Job(fn, args, kwargs)
        with self._cv:
            self._start()
            self._jobs.append(job)
            self._cv.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def wake(self, scheduler):
        """A scheduler has work: step it until it says it has none."""
        with self._cv:
            self._start()
            if scheduler not in self._busy:
                self._busy.append(scheduler)
            self._cv.notify_all()

    def _loop(self):
        while True:
            with self._cv:
                while not self._jobs and not self._busy and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft() if self._jobs else None
                schedulers = list(self._busy)
            if job is not None:
                try:
                    job.result = job.fn(*job.args, **job.kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    job.error = e
                job.done.set()
                job = None  # drop references to the result and arguments
            for scheduler in schedulers:
                if not scheduler.run_once():
                    with self._cv:
                        if not scheduler.has_work() and scheduler in self._busy:
                            self._busy.remove(scheduler)


    def stop(self, timeout: float = 5.0):
        """Ends the thread at interpreter exit (a daemon thread killed inside torch aborts)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


WORKER = Worker()
atexit.register(WORKER.stop)
