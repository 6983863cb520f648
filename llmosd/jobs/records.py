"""Job records on disk, so that jobs outlive the daemon: ``<state_dir>/jobs/<id>/`` holds

    record.json     the job (spec, data digests, state, reason, checkpoint step, owner, times,
                    last metrics), replaced atomically on every change that matters
    metrics.jsonl   one metrics map per line, appended
    log.txt         the job's log, one ``<UTC time> <text>`` line each, appended
    (anything else) the worker's own files: checkpoints (``ctl.job_dir``)

Records are written by the daemon only: ``save`` on the store's writer thread (it fsyncs),
the appends on the control loop (small writes, no fsync: a kill -9 of the daemon loses nothing
the kernel has).  ``last_id`` keeps job ids increasing across restarts even when the newest
records were removed.
"""
from __future__ import annotations

import calendar
import heapq
import json
import logging
import os
import shutil
import tempfile
import time

from llmosd.jobs.queue import TRAINERS, Job, JobState
from llmosd.store.paths import commit_file, own_dir

log = logging.getLogger("llmosd.jobs")

RECORD, METRICS, LOG, LAST_ID = "record.json", "metrics.jsonl", "log.txt", "last_id"
PERSISTED = ("id", "kind", "model", "owner", "spec", "data", "refs", "priority", "device",
             "state", "reason", "created", "started", "finished", "checkpoint_step", "progress",
             "metrics", "val_loss", "preemptible", "preempted", "mem_estimate")


def json_safe(value):
    """``value`` with what JSON cannot hold replaced: bytes by {"bytes": length} (a create's
    vocabulary text is not kept), other odd values by their str."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": len(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def to_record(job: Job) -> dict:
    """The persistent part of ``job`` as a JSON-ready dict (a snapshot: safe to hand to
    another thread)."""
    out = {k: json_safe(getattr(job, k)) for k in PERSISTED}
    out["state"] = job.state.value
    return out


def from_record(d: dict) -> Job:
    """The Job a record describes; ValueError when it is not one."""
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    try:
        job = Job(**{k: d[k] for k in PERSISTED if k in d and k != "state"})
        job.state = JobState(d["state"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"missing or bad field: {e}") from None
    if not isinstance(job.id, int) or isinstance(job.id, bool) or job.id < 1:
        raise ValueError(f"bad job id {job.id!r}")
    if not isinstance(job.spec, dict) or not isinstance(job.data, dict):
        raise ValueError("spec and data must be objects")
    job.refs = [r for r in job.refs if isinstance(r, str)] if isinstance(job.refs, list) else []
    if job.kind not in TRAINERS:   # finished, or failed at start (after_restart): it never runs
        job.refs = []              # again, so the start-up recovery need not keep its blobs
    return job


def stamp(t: float) -> str:
    """UTC time with milliseconds, as each log line starts: 2025-01-31T12:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int(t % 1 * 1000)


def line_time(line: str) -> float:
    """The time a log line starts with (0.0 when it has none)."""
    try:
        return calendar.timegm(time.strptime(line[:19], "%Y-%m-%dT%H:%M:%S")) + int(line[20:23]) / 1000
    except (ValueError, IndexError):
        return 0.0


class Records:
    """The job records under ``root`` (``<state_dir>/jobs``)."""

    def __init__(self, root: str):
        self.root = root
        own_dir(root, "job directory")

    def path(self, job_id: int, name: str | None = None) -> str:
        d = os.path.join(self.root, str(int(job_id)))
        return os.path.join(d, name) if name else d

    def make_dir(self, job_id: int) -> str:
        """Create the job's private directory (it may exist: a resumed job keeps it)."""
        d = self.path(job_id)
        own_dir(d, "job directory")
        return d

    # -- the record ---------------------------------------------------------------------------
    def save(self, record: dict) -> None:
        """Replace the job's record.json atomically with ``record`` (a ``to_record`` snapshot).
        Nothing is written for a job whose directory is gone (removed meanwhile)."""
        d = self.path(record["id"])
        if not os.path.isdir(d):
            return
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".record-")
        f = os.fdopen(fd, "wb")
        try:
            f.write(json.dumps(record, sort_keys=True, indent=1).encode())
        except BaseException:
            f.close()
            os.unlink(tmp)
            raise
        commit_file(f, tmp, os.path.join(d, RECORD), dir_path=d)

    def load(self) -> list[Job]:
        """Every readable record, by id; unreadable ones are skipped with a warning (their
        directories are left alone for a person to look at)."""
        jobs = []
        for name in sorted(os.listdir(self.root), key=lambda n: (len(n), n)):
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self.root, name, RECORD), "rb") as f:
                    job = from_record(json.loads(f.read()))
                if job.id != int(name):
                    raise ValueError(f"it says it is job {job.id}")
            except (OSError, ValueError) as e:
                log.warning("jobs: skipping the record of job %s: %s", name, e)
                continue
            jobs.append(job)
        return jobs

    def last_id(self) -> int:
        """The highest job id ever given (records present or removed)."""
        ids = [int(n) for n in os.listdir(self.root) if n.isdigit()]
        try:
            with open(os.path.join(self.root, LAST_ID)) as f:
                ids.append(int(f.read().strip() or 0))
        except (OSError, ValueError):
            pass
        return max(ids, default=0)

    def remove(self, job_id: int) -> None:
        """Delete the job's directory (record, metrics, log, checkpoints), remembering its id
        so that it is never given again."""
        if self.last_id() <= job_id:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".last_id-")
            f = os.fdopen(fd, "wb")
            f.write(b"%d\n" % job_id)
            commit_file(f, tmp, os.path.join(self.root, LAST_ID), dir_path=self.root)
        shutil.rmtree(self.path(job_id), ignore_errors=True)

    # -- log and metrics ----------------------------------------------------------------------
    def append_line(self, job_id: int, text: str, now: float | None = None) -> list[str]:
        """Append ``text`` (each of its lines) to the job's log, stamped with the time;
        returns the lines as written."""
        t = time.time() if now is None else now
        lines = [f"{stamp(t)} {ln}" for ln in str(text).splitlines() or [""]]
        self._append(job_id, LOG, "".join(ln + "\n" for ln in lines).encode("utf-8", "replace"))
        return lines

    def append_metrics(self, job_id: int, metrics: dict) -> None:
        self._append(job_id, METRICS, (json.dumps(json_safe(metrics), sort_keys=True) + "\n").encode())

    def _append(self, job_id: int, name: str, data: bytes) -> None:
        try:
            fd = os.open(self.path(job_id, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        except OSError as e:             # the job's directory is gone (removed): nothing to keep
            log.debug("jobs: cannot append to %s of job %d: %s", name, job_id, e)
            return
        try:
            os.write(fd, data)
        except OSError as e:
            log.warning("jobs: appending to %s of job %d failed: %s", name, job_id, e)
        finally:
            os.close(fd)

    def sizes(self, job_id: int) -> tuple[int, int]:
        """(log bytes, metrics bytes) now: what a reader started now is to replay."""
        out = []
        for name in (LOG, METRICS):
            try:
                out.append(os.stat(self.path(job_id, name)).st_size)
            except OSError:
                out.append(0)
        return out[0], out[1]

    def read_events(self, job_id: int, sizes: tuple[int, int]) -> list[dict]:
        """The stored log lines and metrics (the first ``sizes`` bytes of each file) as
        ``job_logs`` chunks, ``{"line": str}`` and ``{"metrics": map}``, merged by time.
        Disk work: call it off the control loop."""
        lines = [ln for ln in self._read(job_id, LOG, sizes[0]).decode("utf-8", "replace").splitlines()]
        metrics = []
        for raw in self._read(job_id, METRICS, sizes[1]).splitlines():
            try:
                m = json.loads(raw)
            except ValueError:
                continue
            if isinstance(m, dict):
                metrics.append(m)
        merged = heapq.merge(((line_time(ln), 0, i, {"line": ln}) for i, ln in enumerate(lines)),
                             ((_num(m.get("time")), 1, i, {"metrics": m}) for i, m in enumerate(metrics)))
        return [chunk for *_, chunk in merged]

    def _read(self, job_id: int, name: str, size: int) -> bytes:
        if size <= 0:
            return b""
        try:
            fd = os.open(self.path(job_id, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return b""
        with os.fdopen(fd, "rb") as f:
            data = f.read(size)
        return data[:data.rfind(b"\n") + 1]          # whole lines only


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
