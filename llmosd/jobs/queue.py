"""Jobs as pure data: their states and legal transitions, the row every listing shows, and the
scheduling decision (no torch, no processes, no files: the runner and the records do those).

States (protocol 1.5)::

    queued -> running -> succeeded | failed | cancelled
    running -> pausing -> paused -> queued (resume)
    queued | paused -> cancelled;  pausing -> paused | failed | cancelled
    running | pausing -> queued    (the daemon stops or restarts: re-queued to resume)

Beyond the contract's table, three moves that real runs need: ``queued -> paused`` (hold a job
that has not started), ``pausing -> succeeded`` (the last step ended before the pause was
seen: the result is published) and ``failed -> queued`` (``resume`` of a train job whose worker
died: it continues from its last checkpoint; see ``resumable``).
"""
from __future__ import annotations

import enum
import signal
import time
from dataclasses import dataclass, field

from llmctl.errors import InvalidState


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DONE = "succeeded"           # the name before protocol 1.5 (an alias of SUCCEEDED)


Q, R, PG, P, S, F, C = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSING, JobState.PAUSED,
                        JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

LEGAL: dict[JobState, set[JobState]] = {
    Q: {R, P, C},
    R: {S, F, C, PG, Q},
    PG: {P, F, C, S, Q},
    P: {Q, C},
    F: {Q},                      # resume after a crash: train jobs only (``resumable``)
}
FINISHED = frozenset({S, F, C})
ACTIVE = frozenset({R, PG})      # a worker process exists
KINDS = ("create", "import", "train", "finetune", "eval", "merge")
# Training jobs: checkpointed, so they pause, resume (also after a failure) and are queued again
# after a daemon restart.  The others (create, import, eval, merge) run once, for a client.
TRAINERS = frozenset({"train", "finetune"})
INTERRUPTED = "interrupted by a daemon restart; run it again"


@dataclass
class Job:
    """One job.  The persistent part (everything up to ``metrics``) goes into its record;
    ``process``, ``blobs``, ``stop``, ``requeue`` and the callbacks live only in this daemon.

    ``spec`` is what the worker gets (keys starting with ``_`` are the daemon's: ``_parent``,
    ``_force``); ``data`` maps file names to blob digests; ``refs`` are the blobs the job needs
    kept in the store (its data, its parent's blobs) until its record is removed."""
    id: int
    kind: str
    model: str                     # the target, 'name:tag'
    owner: int | None
    spec: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    refs: list = field(default_factory=list)
    priority: int = 0
    device: str | None = None
    state: JobState = JobState.QUEUED
    reason: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    checkpoint_step: int | None = None
    progress: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)    # the last metrics map
    val_loss: float | None = None                  # the last evaluated one
    # memory (issue 12): a preemptible job is paused when a load needs its room (``preempted``
    # until it is queued again); ``mem_estimate``: the bytes it needs, uncorrected (all ranks)
    preemptible: bool = False
    preempted: bool = False
    mem_estimate: int | None = None
    # runtime only
    process: object = None
    blobs: set = field(default_factory=set)        # blobs the worker added (orphans if it fails)
    stop: str | None = None                        # "pause" | "cancel": asked of the worker
    requeue: bool = False                          # stopping for a daemon shutdown
    mem_bytes: int | None = None                   # measured peak of this run (all ranks)

    @property
    def target(self) -> str:       # the name before protocol 1.5
        return self.model

    @property
    def uid(self) -> int | None:
        return self.owner

    def transition(self, new: JobState, reason: str | None = None, now: float | None = None) -> None:
        """Move to ``new`` (InvalidState unless LEGAL allows it), setting ``reason`` when given
        and the start/finish times."""
        if new not in LEGAL.get(self.state, set()):
            raise InvalidState(f"job {self.id} cannot go from {self.state.value} to {new.value}")
        now = time.time() if now is None else now
        self.state = new
        if reason is not None:
            self.reason = reason
        if new is R:
            self.started, self.finished, self.stop, self.requeue = now, None, None, False
        elif new in FINISHED:
            self.finished = now
        elif new is Q:
            self.finished, self.stop = None, None

    def is_finished(self) -> bool:
        return self.state in FINISHED

    def resumable(self) -> bool:
        """Whether ``resume`` may queue it: paused, or a training job (train, finetune) that
        failed (its worker died or crashed: it continues from its last checkpoint)."""
        return self.state is P or (self.state is F and self.kind in TRAINERS)

    def update_metrics(self, m: dict) -> None:
        """Keep the last metrics map (and the last validation loss, which not every map has)."""
        self.metrics = dict(m)
        if m.get("val_loss") is not None:
            self.val_loss = m["val_loss"]

    def row(self) -> dict:
        """The job as every listing shows it (the wire's job row); unknown values are None."""
        m = self.metrics
        return {"job_id": self.id, "kind": self.kind, "model": self.model, "state": self.state.value,
                "reason": self.reason or None, "step": m.get("step"),
                "max_steps": self.spec.get("max_steps"), "loss": m.get("loss"),
                "val_loss": self.val_loss, "tokens_per_s": m.get("tokens_per_s"),
                "eta_s": m.get("eta_s") if self.state in ACTIVE else None,
                "device": self.device, "owner": self.owner, "priority": self.priority,
                "created": self.created, "started": self.started, "finished": self.finished,
                "checkpoint_step": self.checkpoint_step,
                "nproc": self.spec.get("nproc") if self.kind in TRAINERS else None,
                "pid": getattr(self.process, "pid", None) if self.state in ACTIVE else None,
                "progress": dict(self.progress),     # create/import stage and message (ps)
                "preemptible": self.preemptible, "estimate_bytes": self.mem_estimate,
                "mem_bytes": self.mem_bytes if self.state in ACTIVE else None}


def reads(job: Job) -> set[str]:
    """The stored models (name:tag) a job reads besides the one it makes: the base of a
    fine-tune, a merge or an adapter import, the adapter a merge merges, the model an eval
    evaluates.  ``rm`` refuses to remove them while the job is not finished."""
    spec = job.spec if isinstance(job.spec, dict) else {}
    out = set()
    base = spec.get("_base")
    if isinstance(base, dict) and isinstance(base.get("name"), str):
        out.add(base["name"])
    if isinstance(spec.get("_adapter_name"), str):
        out.add(spec["_adapter_name"])
    if job.kind == "eval":
        out.add(job.model)
    return out


def keeps_refs(job: Job) -> bool:
    """Whether ``job``'s blobs (``refs``) stay kept in the store: a training job's while its
    record exists (it may be resumed, even after a failure), any other job's only until it
    has finished (it never runs again, so a merge or an adapter import pins its base no longer)."""
    return job.kind in TRAINERS or not job.is_finished()


def order(jobs) -> list[Job]:
    """Queued jobs in the order they get a device: higher priority first, FIFO within one."""
    return sorted((j for j in jobs if j.state is Q), key=lambda j: (-j.priority, j.id))


def next_to_start(jobs, running_by_device: dict[str, int], max_jobs: int,
                  admit=None) -> list[Job]:
    """The queued jobs to start now: in ``order``, each whose device has fewer than
    ``max_jobs`` running jobs (counting those started by this decision) and that ``admit(job)``
    lets in (memory: called in order, only for a job that has a slot; None: all).  A full
    device never holds back a job for another device; a job that is not admitted holds back
    no smaller one behind it."""
    busy = dict(running_by_device)
    out = []
    for job in order(jobs):
        if busy.get(job.device, 0) < max_jobs and (admit is None or admit(job)):
            busy[job.device] = busy.get(job.device, 0) + 1
            out.append(job)
    return out


def mem_device(device: str | None) -> str:
    """The memory manager's name of a job's device: "cuda" is "cuda:0", None is "cpu"."""
    if not device:
        return "cpu"
    return "cuda:0" if device == "cuda" else device


def estimator_key(job: Job) -> tuple:
    """What the estimator learns a job's measured/estimated ratio under: its kind (train,
    finetune), its method (full, lora, classify) and its device type."""
    method = job.spec.get("method", "full") if isinstance(job.spec, dict) else "full"
    return ("job", job.kind, method, mem_device(job.device).partition(":")[0])


def running_by_device(jobs) -> dict[str, int]:
    """{device: number of jobs with a worker} (running or pausing)."""
    out: dict[str, int] = {}
    for j in jobs:
        if j.state in ACTIVE:
            out[j.device] = out.get(j.device, 0) + 1
    return out


def after_restart(job: Job, now: float | None = None) -> bool:
    """What a daemon start does to a job loaded from its record (it may have been cut off by a
    crash or a kill -9): a training job (train, finetune) that was running, pausing or queued
    is queued again (it resumes from its last checkpoint), and so is one paused to make room
    for a load (``preempted``: no user asked for that pause); any other job (create, import,
    eval, merge) that was running or queued failed (its client is gone) and keeps no blobs
    (``keeps_refs``).  Returns whether the job changed."""
    if job.state is P and job.preempted and job.kind in TRAINERS:
        job.transition(Q, "", now=now)
        job.preempted = False
        return True
    if job.state not in (Q, R, PG):
        return False
    if job.kind in TRAINERS:
        if job.state is Q:
            return False
        job.transition(Q, now=now)
        return True
    job.state, job.reason = F, INTERRUPTED          # a fact found at start, not a move
    job.finished = time.time() if now is None else now
    job.refs = []
    return True


def outcome(job: Job, kind: str, detail) -> tuple[JobState | None, str]:
    """How a worker's end moves its job: (new state, reason).  ``kind``: "result" (a manifest:
    None, the job waits for publishing), "stopped" (it honoured a pause: detail "paused", or a
    cancel: "cancelled"), "error" (detail: the message) or "exit" (no word from it; detail: the
    exit code, negative for a signal).  A stop that was asked for wins over how the worker
    ended, so a pause the worker could not finish leaves it paused at its last checkpoint."""
    if job.stop == "cancel":
        return C, "cancelled"
    if kind == "result":
        return None, ""
    paused = Q if job.requeue else P
    if kind == "stopped":
        return (C, "cancelled") if detail == "cancelled" else (paused, "")
    if job.stop == "pause" and kind == "exit":
        return paused, ""
    if kind == "error":
        return F, str(detail)
    return F, exit_reason(detail)


def exit_reason(code: int | None) -> str:
    """Why a worker that said nothing ended: "worker killed by signal 9 (SIGKILL)", ..."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        hint = "; out of memory, or killed" if -code == signal.SIGKILL else ""
        return f"worker killed by signal {-code} ({name}{hint})"
    return f"worker exited with status {code} without a result"
