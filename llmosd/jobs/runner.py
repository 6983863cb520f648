"""Jobs: long work (create now; pretraining and fine-tuning later) in worker processes.

A job runs ``func(spec, store_root, progress)`` in a fresh ``spawn`` process, so a
crash or an out-of-memory kill there never takes the daemon down.  A monitor thread relays the
worker's progress and result to the control loop through ``post``.  Workers die with the
daemon (PR_SET_PDEATHSIG), so a killed daemon leaves no orphan writing into the store.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing as mp
import signal
import threading
import traceback
from typing import Callable

from llmosd.jobs.queue import Job, JobState

log = logging.getLogger("llmosd.jobs")


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _report_new_blobs(conn) -> None:
    """In the worker: tell the daemon of each blob the job adds, so that a job that fails (or
    whose manifest cannot be published) leaves no orphan blobs behind."""
    from llmosd.store.store import Store
    put = Store.put_blob

    def put_blob(self, data):
        digest, size = put(self, data)
        conn.send(("blob", digest))
        return digest, size
    Store.put_blob = put_blob


def _worker_main(conn, func: Callable, spec: dict, store_root: str, threads: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the daemon decides when we stop
    try:
        _report_new_blobs(conn)
        import torch
        torch.set_num_threads(threads)
        result = func(spec, store_root, lambda p: conn.send(("progress", p)))
        conn.send(("result", result))
    except ValueError as e:       # bad input the job found: the message is for the user
        conn.send(("error", {"message": str(e), "invalid": True}, traceback.format_exc()))
    except BaseException as e:
        conn.send(("error", {"message": f"{e.__class__.__name__}: {e}", "invalid": False},
                   traceback.format_exc()))
    finally:
        conn.close()


class JobRunner:
    def __init__(self, post: Callable, store_root: str, threads: int = 1):
        self.post, self.store_root, self.threads = post, store_root, threads
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._mp = mp.get_context("spawn")

    def start(self, kind: str, target: str, func: Callable, spec: dict, uid: int | None,
              on_progress: Callable[[Job, dict], None],
              on_done: Callable[[Job, dict | None, dict | None], None]) -> Job:
        """Start ``func(spec, store_root, progress)`` in a worker.  ``func`` must be a
        module-level function: spawn sends it to the worker by reference (its module's name
        and its own), so its module should import torch inside the function, not at the top,
        for the daemon to name it cheaply.  Callbacks run on the control loop thread."""
        job = Job(next(self._ids), kind, target, uid)
        parent, child = self._mp.Pipe(duplex=False)
        job.process = self._mp.Process(target=_worker_main, name=f"llmosd-{kind}-{job.id}",
                                       args=(child, func, spec, self.store_root, self.threads),
                                       daemon=True)
        job.process.start()
        child.close()
        self.jobs[job.id] = job
        threading.Thread(target=self._monitor, args=(job, parent, on_progress, on_done),
                         name=f"job-{job.id}", daemon=True).start()
        return job

    def _monitor(self, job: Job, conn, on_progress, on_done) -> None:
        result, error = None, None
        try:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "progress":
                    self.post(on_progress, job, msg[1])
                elif msg[0] == "blob":
                    job.blobs.add(msg[1])
                elif msg[0] == "result":
                    result = msg[1]
                elif msg[0] == "error":
                    error = msg[1]
                    log.warning("job %d failed: %s", job.id, msg[2])
        finally:
            job.process.join()
            code = job.process.exitcode
            if result is None and error is None:
                error = {"message": f"worker process was killed by signal {-code}" if code and code < 0
                         else f"worker process exited with status {code}", "invalid": False}
            self.post(self._finish, job, result, error, on_done)

    def _finish(self, job: Job, result, error, on_done) -> None:
        if job.state is JobState.RUNNING:
            job.transition(JobState.DONE if error is None else JobState.FAILED)
        job.error = error["message"] if error else ""
        self.jobs.pop(job.id, None)
        on_done(job, result, error)

    def cancel(self, job_id: int) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.state is JobState.RUNNING:
            job.transition(JobState.CANCELLED)
            if job.process and job.process.is_alive():
                job.process.kill()

    def cancel_all(self) -> None:
        for jid in list(self.jobs):
            self.cancel(jid)

    def idle(self) -> bool:
        return not self.jobs

    def writing(self, target: str) -> bool:
        """Whether a running job is making model ``target``."""
        return any(j.target == target for j in self.jobs.values())
