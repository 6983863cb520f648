"""The daemon's jobs: the queue, the worker processes, the records, and who listens.

Every job (create, import, train, finetune, eval, merge) is queued, started by ``queue.next_to_start`` when its
device has room (``max_jobs`` per device) and run as ``func(spec, store_root, ctl)`` in a
fresh ``spawn`` process (``jobs.worker``), so a crash or an out-of-memory kill there never
takes the daemon down.  A monitor thread per worker relays its messages to the control loop
through ``post``; everything else here runs on the loop.  Pause and cancel are signals the
worker honours between steps (SIGUSR1, SIGTERM), with SIGKILL after ``stop_timeout`` seconds.
Workers die with the daemon (PR_SET_PDEATHSIG), so a killed daemon leaves no orphan writing
into the store; the records let the next daemon resume its training jobs (train, finetune).

A job that returns a manifest stays ``running`` until the caller has published it and says
so with ``settle``.

Memory (issue 12) is ``jobs.memory.JobMemory``'s, a mixin of this class: a train or finetune
job reserves its estimate before it starts (``next_to_start`` asks ``_admit``), its worker's
``mem_bytes`` move the reservation (``_measured``), it is given back when the worker ends
(``_release``), and ``preempt`` pauses a preemptible job for a load.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from llmctl.errors import InvalidState
from llmosd.jobs import worker
from llmosd.jobs.memory import JobMemory
from llmosd.jobs.queue import (ACTIVE, TRAINERS, Job, JobState, after_restart, keeps_refs,
                               next_to_start, outcome, reads, running_by_device)
from llmosd.jobs.records import Records, to_record

log = logging.getLogger("llmosd.jobs")

C, F, P, PG, Q, R, S = (JobState.CANCELLED, JobState.FAILED, JobState.PAUSED, JobState.PAUSING,
                        JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED)
SAVE_EVERY_S = 10.0          # the record's last metrics are at most this old


@dataclass
class Hooks:
    """What a job runs and who hears of it: ``on_progress(job, p)``; ``on_done(job, manifest,
    error)`` once the worker has ended with a result (manifest), an error (dict) or a cancel."""
    func: Callable | str
    on_progress: Callable | None = None
    on_done: Callable | None = None


class JobRunner(JobMemory):
    def __init__(self, post: Callable, store_root: str, records: Records, threads: int = 1, *,
                 max_jobs: int = 1, stop_timeout: float = 30.0, jobs=(), write: Callable | None = None,
                 memory=None):
        """``jobs``: those loaded from the records (``after_restart`` is applied here);
        ``write(fn, done, *args)``: where record saves run (the store's writer), else at once."""
        self.post, self.store_root, self.records, self.threads = post, store_root, records, threads
        self.max_jobs, self.stop_timeout, self.write = max_jobs, stop_timeout, write
        self.jobs: dict[int, Job] = {}
        self.hooks: dict[int, Hooks] = {}
        self.listeners: dict[int, list[Callable[[dict, Job], None]]] = {}
        self.waiters: dict[int, list[Callable[[Job], None]]] = {}
        self.stopping = False
        self._reserved: dict[object, frozenset] = {}
        self._refs: frozenset = frozenset()
        self._saved_at: dict[int, float] = {}
        self._pidfds: dict[int, int] = {}
        self._mp = mp.get_context("spawn")
        self._init_memory(memory)
        for job in jobs:
            self.jobs[job.id] = job
            was = job.state.value
            if after_restart(job):
                self._log(job, f"{was} when the daemon stopped: "
                          + ("queued again, to resume" if job.state is Q else job.reason))
                self._save(job)
        self._next_id = max([records.last_id(), *self.jobs]) + 1
        self._update_refs()

    # -- submitting ---------------------------------------------------------------------------
    def start(self, kind: str, target: str, func: Callable | str, spec: dict, uid: int | None,
              on_progress: Callable | None = None, on_done: Callable | None = None, *,
              data: dict | None = None, refs=(), priority: int = 0, device: str = "cpu",
              preemptible: bool = False, mem_estimate: int | None = None) -> Job:
        """Queue a job making model ``target`` with ``func`` (a module-level function, sent to
        the worker by reference, or "module:function" imported only there); it starts at once
        when its device has room.  Callbacks run on the loop.  ``mem_estimate``: the bytes a
        train/finetune job needs (uncorrected); InvalidArgument, with nothing queued, when
        that is more than its device's whole budget."""
        job = Job(self._next_id, kind, target, uid, spec=spec, data=dict(data or {}),
                  refs=sorted(set(refs) | set((data or {}).values())), priority=priority, device=device,
                  preemptible=bool(preemptible) and kind in TRAINERS, mem_estimate=mem_estimate)
        self._check_budget(job)
        self._next_id += 1
        self.records.make_dir(job.id)
        self.jobs[job.id] = job
        self.hooks[job.id] = Hooks(func, on_progress, on_done)
        self._update_refs()
        self._log(job, f"queued: {kind} of {target} on {device} (priority {priority})")
        self._changed(job)
        self.schedule()
        return job

    def attach(self, job: Job, func: Callable | str, on_progress=None, on_done=None) -> None:
        """Give a job loaded from its record what it runs (before ``schedule``)."""
        self.hooks[job.id] = Hooks(func, on_progress, on_done)

    def reserve(self, key, digests) -> None:
        """Keep ``digests`` in the store under ``key`` (a submission being checked) until
        ``release(key)``: the store's clean-ups see them as referenced."""
        self._reserved[key] = frozenset(digests)
        self._update_refs()

    def release(self, key) -> None:
        self._reserved.pop(key, None)
        self._update_refs()

    def refs(self) -> frozenset:
        """Blobs that jobs need kept (thread-safe: the store's writer asks)."""
        return self._refs

    def _update_refs(self) -> None:
        refs = {r for j in self.jobs.values() if keeps_refs(j) for r in j.refs}
        for digests in self._reserved.values():
            refs |= digests
        self._refs = frozenset(refs)          # one reference swap: readers see old or new

    # -- scheduling and workers ---------------------------------------------------------------
    def schedule(self) -> None:
        """Start the queued jobs whose device has room (not while the daemon stops)."""
        if self.stopping:
            return
        ready = [j for j in self.jobs.values() if j.id in self.hooks]
        for job in next_to_start(ready, running_by_device(self.jobs.values()), self.max_jobs,
                                 admit=self._admit):
            self._launch(job)

    def _launch(self, job: Job) -> None:
        hooks = self.hooks[job.id]
        job.transition(R)
        job.blobs = set()
        parent, child = self._mp.Pipe(duplex=False)
        job_dir = self.records.make_dir(job.id)
        try:
            proc = self._mp.Process(target=worker.main, name=f"llmosd-{job.kind}-{job.id}",
                                    args=(child, hooks.func, job.spec, self.store_root,
                                          self.threads, job.id, job_dir), daemon=True)
            proc.start()
        except Exception as e:     # noqa: BLE001 - fork limits, memory: the job fails, we go on
            child.close()
            parent.close()
            job.process = None
            self._end(job, F, f"could not start a worker: {e}", {"message": str(e), "invalid": False})
            return
        child.close()
        job.process = proc
        try:                       # before anyone waits for it, so the pid cannot be reused yet
            self._pidfds[job.id] = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pass
        self._log(job, f"started on {job.device} (worker pid {proc.pid})"
                  + (f", from the checkpoint of step {job.checkpoint_step}" if job.checkpoint_step else ""))
        self._changed(job)
        threading.Thread(target=self._monitor, args=(job, parent, proc),
                         name=f"job-{job.id}", daemon=True).start()

    def _monitor(self, job: Job, conn, proc) -> None:
        """On the job's thread: relay the worker's messages; when it ends, say how."""
        end = None
        try:
            while True:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                except Exception as e:     # noqa: BLE001 - an unpicklable message
                    end = ("error", {"message": f"bad message from the worker: {e}", "invalid": False})
                    break
                if msg[0] == "blob":
                    job.blobs.add(msg[1])
                elif msg[0] in ("result", "stopped", "error"):
                    end = msg[:2]
                    if msg[0] == "error" and len(msg) > 2:
                        log.warning("job %d failed: %s", job.id, msg[2])
                else:
                    self.post(self._message, job, msg)
        finally:
            conn.close()
            proc.join()
            if end is None:
                end = ("exit", proc.exitcode)
            self.post(self._ended, job, proc, *end)

    def _message(self, job: Job, msg: tuple) -> None:
        kind, value = msg[0], msg[1]
        hooks = self.hooks.get(job.id)
        if kind == "progress" and isinstance(value, dict):
            text = value.get("message") or value.get("stage")
            if text and text != (job.progress.get("message") or job.progress.get("stage")):
                self._log(job, str(text))
            job.progress = value
            if hooks and hooks.on_progress:
                hooks.on_progress(job, value)
        elif kind == "metrics" and isinstance(value, dict):
            job.update_metrics(value)
            self._measured(job, value.get("mem_bytes"))
            self.records.append_metrics(job.id, value)
            self._notify(job, {"metrics": value})
            if time.monotonic() - self._saved_at.get(job.id, 0.0) > SAVE_EVERY_S:
                self._save(job)
        elif kind == "log":
            self._log(job, str(value))
        elif kind == "checkpoint":
            job.checkpoint_step = int(value)
            self._save(job)

    def _ended(self, job: Job, proc, kind: str, detail) -> None:
        """The worker ``proc`` of ``job`` is gone (on the loop)."""
        fd = self._pidfds.pop(job.id, None)
        if fd is not None:
            os.close(fd)
        if job.process is not proc or job.state not in ACTIVE:
            return                              # a stale report (the job was removed or restarted)
        message = detail.get("message", "") if isinstance(detail, dict) else detail
        new, reason = outcome(job, kind, message)
        if new is None:                         # a manifest: the caller publishes, then settles
            self._release(job)
            self._log(job, "the worker finished; publishing the result")
            hooks = self.hooks.get(job.id)
            if hooks and hooks.on_done:
                hooks.on_done(job, detail, None)
            else:
                self.settle(job, "nothing publishes this job's result")
            return
        self._end(job, new, reason, detail if kind == "error" else None)

    def _end(self, job: Job, new: JobState, reason: str, error: dict | None) -> None:
        """Move a job whose worker is gone to ``new`` and tell whoever waits.  Its memory is
        given back before the waiters hear (a load waiting for a preempted job's room)."""
        preempted = new is P and job.preempted
        job.transition(new, reason if new in (F, C) else self._preempt_reason.pop(job.id, "")
                       if preempted else "")
        if new is not P:
            job.preempted = False
        self._log(job, {P: lambda: f"paused (checkpoint of step {job.checkpoint_step})"
                        + (f": {job.reason}" if preempted else ""),
                        Q: lambda: "stopped with the daemon: queued again, to resume",
                        C: lambda: "cancelled",
                        F: lambda: f"failed: {reason}"}[new]())
        self._changed(job)
        if preempted:                       # not queued again by the room it has just freed
            self._held.add(job.id)
            self.post(self._held.discard, job.id)
        self._release(job)
        if new in (F, C):
            hooks = self.hooks.get(job.id)
            if hooks and hooks.on_done:
                hooks.on_done(job, None, error or ({"message": reason, "invalid": False} if new is F else None))
        self._wake(job)
        self.schedule()

    def settle(self, job: Job, reason: str | None) -> None:
        """Publishing a finished worker's result is over: the job succeeded (``reason`` None)
        or failed with ``reason``.  Nothing for a job already settled."""
        if job.state not in ACTIVE:
            return
        job.transition(S if reason is None else F, reason)
        job.preempted = False
        done = "succeeded" if job.kind == "eval" else f"succeeded: {job.model} published"
        self._log(job, done if reason is None else f"failed: {reason}")
        self._changed(job)
        self._wake(job)
        self.schedule()

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, job: Job, what: str, reply: Callable[[Job], None] | None = None) -> None:
        """Pause (training jobs only: train, finetune) or cancel ``job``; ``reply(job)`` once it
        has stopped (at once when no worker runs).  InvalidState when that is not possible in
        its state."""
        if what == "pause" and job.kind not in TRAINERS:
            raise InvalidState(f"job {job.id} is a {job.kind} job; only train and finetune jobs "
                               "can be paused",
                               hint=f"cancel it instead: llmctl cancel {job.id}")
        if job.is_finished():
            raise InvalidState(f"job {job.id} is {job.state.value}; it cannot be "
                               + ("paused" if what == "pause" else "cancelled"))
        if job.state in (Q, P):                   # no worker: the move is made now
            self._release(job)                    # a queued job's reservation (making room)
            if what == "cancel":
                job.preempted = False
                job.transition(C, "cancelled")
                self._log(job, "cancelled")
                self._changed(job)
                hooks = self.hooks.get(job.id)
                if hooks and hooks.on_done:
                    hooks.on_done(job, None, None)
            elif job.state is Q:
                job.transition(P, "")
                self._log(job, "paused before it started")
                self._changed(job)
            elif job.preempted:                   # its owner's pause now: no automatic resume
                job.preempted = False
                job.reason = ""
                self._log(job, "paused by its owner: it resumes only when asked (llmctl resume)")
                self._changed(job)
            if reply:
                reply(job)
            return
        if reply:
            self.waiters.setdefault(job.id, []).append(reply)
        if what == "pause" and job.stop == "pause" and job.preempted:
            self._owner_pause(job)                # a user's pause while it is preempted
            return
        if job.stop == "cancel" or job.stop == what:
            return                                # asked already
        job.stop = what
        if what == "pause":
            job.transition(PG)
            self._changed(job)
        self._log(job, f"{what} requested")
        self._signal(job, what)

    def _owner_pause(self, job: Job) -> None:
        """Its owner pauses ``job`` while a preemption pauses it: it stays paused when the
        room comes back (no automatic resume), as if its owner had paused it first."""
        job.preempted = False
        self._preempt_reason.pop(job.id, None)
        self._log(job, "paused by its owner while it was preempted: it resumes only when asked "
                       "(llmctl resume)")
        self._changed(job)

    def _signal(self, job: Job, what: str) -> None:
        """Ask the worker to stop; create, import, eval and merge have nothing to keep, so
        they are killed.  A worker that has not stopped after ``stop_timeout`` seconds is killed."""
        if job.kind not in TRAINERS:
            self._kill(job, signal.SIGKILL)
            return
        self._kill(job, signal.SIGUSR1 if what == "pause" else signal.SIGTERM)
        timer = threading.Timer(self.stop_timeout, self.post, (self._deadline, job, job.process))
        timer.daemon = True
        timer.start()

    def _kill(self, job: Job, sig: int) -> None:
        """Send ``sig`` to the job's worker through its pidfd (never to a reused pid)."""
        fd = self._pidfds.get(job.id)
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            elif job.process is not None and job.state in ACTIVE:
                os.kill(job.process.pid, sig)
        except (ProcessLookupError, OSError):
            pass                                  # it has just ended: the monitor says so

    def _deadline(self, job: Job, proc) -> None:
        if job.process is proc and job.state in ACTIVE:
            self._log(job, f"the worker did not stop within {self.stop_timeout:g}s: killed")
            self._kill(job, signal.SIGKILL)

    def cancel(self, job_id: int) -> None:
        """Cancel a job if it is not finished (its client went away)."""
        job = self.jobs.get(job_id)
        if job is not None and not job.is_finished() and not job.stop == "cancel":
            self.stop(job, "cancel")

    def shutdown(self) -> None:
        """The daemon stops: running training jobs (train, finetune) pause (checkpoint) and are
        queued again for the next start; the others are cancelled; nothing new starts."""
        self.stopping = True
        for job in list(self.jobs.values()):
            if job.kind in TRAINERS:
                if job.state is R and job.stop is None:
                    job.requeue = True
                    self.stop(job, "pause")
            elif job.state in (Q, R):
                self.stop(job, "cancel")

    cancel_all = shutdown

    def _wake(self, job: Job) -> None:
        for reply in self.waiters.pop(job.id, []):
            reply(job)

    # -- queries and removal --------------------------------------------------------------------
    def idle(self) -> bool:
        """No worker is running (shutdown waits for this)."""
        return not any(j.state in ACTIVE for j in self.jobs.values())

    def writing(self, target: str) -> bool:
        """Whether an unfinished job (queued, running, paused) makes model ``target`` (an eval
        job names the model it reads, and makes none)."""
        return any(j.model == target and j.kind != "eval" and not j.is_finished()
                   for j in self.jobs.values())

    def readers(self, model: str) -> list[int]:
        """Ids of the jobs that read stored model ``model`` (``queue.reads``) and are not
        finished, or may run again (a failed training job can be resumed: its base must stay)."""
        return sorted(j.id for j in self.jobs.values()
                      if (not j.is_finished() or j.resumable()) and model in reads(j))

    def drop_refs(self, job: Job) -> None:
        """``job`` no longer needs its blobs kept (an eval that ended: nothing refers to them)."""
        job.refs = []
        self._update_refs()
        self._save(job)

    def note(self, job: Job, text: str) -> None:
        """A line in the job's log from its owner (e.g. an eval's metrics)."""
        self._log(job, text)

    def resume(self, job: Job) -> None:
        """Queue a paused job (or a training job that failed) again: it goes on from its last
        checkpoint.  InvalidState otherwise."""
        if not job.resumable():
            raise InvalidState(f"job {job.id} is {job.state.value}; only a paused job, or a train "
                               "or finetune job that failed, can be resumed")
        job.transition(Q, "")
        job.preempted = False
        self._log(job, "resumed: queued" + (f" (from the checkpoint of step {job.checkpoint_step})"
                                            if job.checkpoint_step else ""))
        self._changed(job)
        self.schedule()

    def remove(self, job: Job, done: Callable) -> None:
        """Forget a finished job and delete its directory (off the loop, like record saves);
        ``done(result, error)`` on the loop afterwards.  Its blobs are no longer kept."""
        if not job.is_finished():
            raise InvalidState(f"job {job.id} is {job.state.value}; only finished jobs can be removed",
                               hint=f"cancel it first: llmctl cancel {job.id}")
        self._release(job)
        self.jobs.pop(job.id, None)
        self.hooks.pop(job.id, None)
        self.listeners.pop(job.id, None)
        self._saved_at.pop(job.id, None)
        self._update_refs()
        (self.write or _now)(self.records.remove, done, job.id)

    # -- listeners, log, record ---------------------------------------------------------------
    def subscribe(self, job_id: int, fn: Callable[[dict, Job], None]) -> None:
        self.listeners.setdefault(job_id, []).append(fn)

    def unsubscribe(self, job_id: int, fn) -> None:
        fns = self.listeners.get(job_id, [])
        if fn in fns:
            fns.remove(fn)

    def _notify(self, job: Job, chunk: dict) -> None:
        for fn in list(self.listeners.get(job.id, [])):
            fn(chunk, job)

    def _log(self, job: Job, text: str) -> None:
        for line in self.records.append_line(job.id, text):
            self._notify(job, {"line": line})

    def _changed(self, job: Job) -> None:
        """A state change: saved, and told to listeners as a row.  A job that ended and
        never runs again lets go of its blobs (``queue.keeps_refs``)."""
        if job.refs and not keeps_refs(job):
            job.refs = []
            self._update_refs()
        self._save(job)
        self._notify(job, {"row": job.row()})

    def _save(self, job: Job) -> None:
        self._saved_at[job.id] = time.monotonic()
        (self.write or _now)(self.records.save, _save_done, to_record(job))


def _now(fn, done, *args) -> None:
    """A write run at once (no store writer): the same contract, synchronously."""
    try:
        result, error = fn(*args), None
    except Exception as e:     # noqa: BLE001
        result, error = None, e
    done(result, error)


def _save_done(result, error) -> None:
    if error is not None:
        log.warning("jobs: saving a job record failed: %s", error)
