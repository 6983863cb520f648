"""The job half of the client: submit training, list, inspect, stop and follow jobs.

    with Client() as c:
        row = c.train("tiny-char", ["input.txt"], {"tokenizer": "char", "max_steps": 200})
        log = c.job_logs(row["job_id"], follow=True)
        for chunk in log:                 # {"line": str} | {"metrics": map} | {"row": row}
            print(chunk)
        print(log.result["job"]["state"])

A job row (``jobs``, ``job``, every ``--json``) has: job_id, kind, model, state, reason, step,
max_steps, loss, val_loss, tokens_per_s, eta_s, device, owner, priority, created, started,
finished, checkpoint_step, nproc, pid (unknown values are None).  ``JobsMixin`` is a base of
``Client``; it uses only the client's ``_call``, ``_start_stream`` and ``upload_file``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .errors import InvalidArgument
from .trainspec import check_spec, data_files
from .upload import RESEND

__all__ = ["JobsMixin", "JobLog", "FINISHED"]

FINISHED = ("succeeded", "failed", "cancelled")


class JobLog:
    """A ``job_logs`` stream: iterate for its chunk dicts, in order; once exhausted, ``result``
    is the end body ({"job": row}: the finished job when following, else the job as it is)."""

    def __init__(self, job_id: int, stream: Iterator[dict]):
        self.job_id, self._stream = job_id, stream
        self.result: dict | None = None

    def __iter__(self) -> "JobLog":
        return self

    def __next__(self) -> dict:
        if self.result is not None:
            raise StopIteration
        try:
            return next(self._stream)
        except StopIteration as stop:
            self.result = stop.value or {}
            raise StopIteration from None

    @property
    def row(self) -> dict | None:
        """The job's row from the end body (None until the stream is exhausted)."""
        return None if self.result is None else self.result.get("job")


class JobsMixin:
    """Job operations of ``Client`` (protocol 1.5)."""

    def train(self, name: str, data_paths: Iterable[str], spec: dict, priority: int = 0,
              force: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
        """Submit a training job for model ``name`` on the text/JSONL files ``data_paths``;
        returns its row.  ``spec`` holds the spec keys (llmctl.trainspec.SPEC_KEYS); if ``name``
        exists, training continues from it.  Every file is checked before anything is sent, then
        each is uploaded unless the store has its content (``progress`` hears {file, sent,
        size[, skipped]}).  The daemon checks spec and data and refuses (InvalidArgument) without
        queueing anything."""
        files = data_files(list(data_paths))
        spec = check_spec(dict(spec))
        body = {"name": name, "spec": spec}
        if priority:
            body["priority"] = int(priority)
        if force:
            body["force"] = True
        for attempt in (1, 2):
            body["data"] = {rel: self.upload_file(p, progress) for rel, p in files.items()}
            try:
                return self._call("train", body, timeout=self._work_timeout)["job"]
            except InvalidArgument as e:      # said "have" for an import's source: send, retry
                if attempt == 2 or RESEND not in str(e):
                    raise

    def jobs(self, all: bool = False) -> list[dict]:       # noqa: A002 - the wire's name
        """Queued, running and paused jobs; with ``all``, the finished ones too."""
        return self._call("jobs", {"all": True} if all else {})["jobs"]

    def job(self, job_id: int) -> dict:
        """{"job": row, "spec": the spec it runs with, "data": {filename: digest}}."""
        return self._call("job", {"job": int(job_id)})

    def job_rm(self, job_id: int) -> dict:
        """Delete a finished job's record, metrics, log and checkpoints: {"removed": id}."""
        return self._call("job_rm", {"job": int(job_id)})

    def job_cancel(self, job_id: int) -> dict:
        """Cancel a job (queued, running or paused); returns its row (cancelled at once when it
        was not running, else as it stops)."""
        return self._call("job_cancel", {"job": int(job_id)})["job"]

    def job_pause(self, job_id: int) -> dict:
        """Ask a running job to checkpoint and stop (pausing, then paused); returns its row."""
        return self._call("job_pause", {"job": int(job_id)})["job"]

    def job_resume(self, job_id: int) -> dict:
        """Queue a paused job again (it continues from its checkpoint); returns its row."""
        return self._call("job_resume", {"job": int(job_id)})["job"]

    def job_logs(self, job_id: int, follow: bool = False) -> JobLog:
        """The job's log lines, metrics and state changes as a ``JobLog``: what is stored so far,
        and with ``follow`` what comes next until the job finishes.  Leaving a followed stream
        early (Ctrl-C) detaches: the job goes on."""
        body = {"job": int(job_id)}
        if follow:
            body["follow"] = True
        _, stream = self._start_stream("job_logs", body)
        return JobLog(int(job_id), stream)
