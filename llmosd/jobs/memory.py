"""The job runner's memory (issue 12): reservations, room made, preemption, measured bytes.

``JobMemory`` is a mixin of ``jobs.runner.JobRunner`` (it runs on the control loop and uses the
runner's ``jobs``, ``hooks``, ``stopping``, ``post``, ``schedule``, ``stop``, ``_log`` and
``_changed``); the decisions themselves are ``mem.policy``'s, through the ``memory`` manager
(``mem.manager.MemoryManager``; None: no accounting).  Its contract:

- a train or finetune job reserves its estimate (``mem_estimate``, corrected by the manager's
  estimator) on its device before it starts (``_admit``, asked by ``queue.next_to_start``);
  more than the device's whole budget is refused at submit (``_check_budget``);
- a plan that needs idle instances evicted is carried out by ``make_room(plan, done)`` (the
  instance manager's side, wired by ``use_instances``; ``done(ok)``), the room being the job's
  meanwhile; a room never made (``done(False)``, or the error) leaves it queued, waiting for
  memory freed (never started over the budget); a job that does not fit stays queued with the
  reason; its plans count the instances still swapping out on the host tier already
  (``host_pending``), as the instance side's do;
- the reservation follows what the worker measures (``mem_bytes`` in its metrics; the
  estimator learns) and is given back when the worker ends or the job leaves the queue;
- a ``preemptible`` job is paused when a load needs its room (``preempt``) and queued again to
  resume from its checkpoint when the room comes back (the manager's ``on_freed``);
- ``holders`` lists the jobs holding memory as policy ``Holder`` rows, for every admission.
"""
from __future__ import annotations

from typing import Callable

from llmctl.errors import InvalidArgument
from llmosd.jobs.queue import ACTIVE, TRAINERS, Job, JobState, estimator_key, mem_device
from llmosd.mem.manager import device_name
from llmosd.mem.policy import Holder, never_fits, plan_admission, size_text

P, Q, R = JobState.PAUSED, JobState.QUEUED, JobState.RUNNING


class JobMemory:
    def _init_memory(self, memory) -> None:
        """``memory``: the daemon's memory manager, or None.  ``make_room`` and
        ``other_holders`` are registered by the instance manager's side (``use_instances``):
        other_holders() -> its instances as policy Holders."""
        self.memory = memory
        self.make_room: Callable | None = None
        self.other_holders: Callable[[], list] | None = None
        self.host_pending: Callable[[], int] = lambda: 0
        self._charged: dict[int, str] = {}           # job id -> device its reservation is on
        self._making_room: set[int] = set()          # queued jobs whose room is being made
        self._no_room: set[int] = set()              # make_room failed: wait for memory freed
        self._held: set[int] = set()                 # just preempted: not requeued this turn
        self._preempt_reason: dict[int, str] = {}
        self._freed_posted = False
        self._freed_clear = False                    # a freeing not the runner's own: _no_room goes
        self._quiet = False                          # the runner moves its own reservation
        if memory is not None:
            memory.on_freed(self._on_freed)

    def _need(self, job: Job) -> int | None:
        """The bytes ``job`` reserves (its estimate as corrected), or None: no reservation."""
        if self.memory is None or job.kind not in TRAINERS or not job.mem_estimate:
            return None
        return self.memory.estimator.correct(estimator_key(job), job.mem_estimate)

    def _check_budget(self, job: Job) -> None:
        """InvalidArgument (it can never fit: not "try again") when ``job`` needs more than its
        device's whole budget; the hint names the fix its own command offers (``job_fix``)."""
        need = self._need(job)
        device = mem_device(job.device)
        if need is not None and need > self.memory.budget(device):
            msg, hint = never_fits(need, device, self.memory.budget(device),
                                   f"{job.kind} of {job.model}", job_fix(job), about=True)
            raise InvalidArgument(msg, hint=hint)

    def holders(self, device: str | None = None, *, evictable: bool = True) -> list:
        """The jobs holding memory (on ``device``, or all) as ``mem.policy.Holder`` rows: a
        preemptible running job is ``idle`` (a load may pause it) unless ``evictable`` is
        False; queued jobs whose room is being made hold their reservation too."""
        out = []
        for jid, dev in sorted(self._charged.items()):
            job = self.jobs.get(jid)
            if job is None or (device is not None and dev != device):
                continue
            held = self.memory.charged(("job", jid)) if hasattr(self.memory, "charged") else None
            idle = evictable and job.preemptible and job.state is R and job.stop is None
            out.append(Holder("job", jid, job.model, dev, "device", held[2] if held else 0,
                              job.owner, False, job.priority, job.started or job.created,
                              idle=idle, preemptible=job.preemptible))
        return out

    def use_instances(self, holders: Callable[[], list], make_room: Callable,
                      host_pending: Callable[[], int] | None = None) -> None:
        """Wire the instance manager in: ``holders()``, everything holding memory as policy
        Holders (its instances; the jobs it lists are this runner's own, left out here);
        ``make_room(actions, go, *, fail=)`` (``Placement.make_room``), which carries a plan's
        actions out and calls ``go()`` once their memory has left the device, or
        ``fail(error)`` when it never does; ``host_pending()``, the bytes of instances
        swapping out, bound for the host tier but not yet charged there."""
        self.other_holders = lambda: [h for h in holders() if h.kind != "job"]
        self.make_room = lambda plan, done: make_room(plan.actions, lambda: done(True), fail=done)
        self.host_pending = host_pending if host_pending is not None else (lambda: 0)

    def _plan(self, job: Job, need: int):
        """The manager's plan for ``job``, with the host tier's room less what instances
        swapping out will take there (``host_pending``): else a job's plan right after a
        load's would swap more to the host than it has room for."""
        m, device = self.memory, device_name(mem_device(job.device))
        others = list(self.other_holders()) if self.other_holders else []
        return plan_admission(need, device, job.priority,
                              m.holders(others + self.holders(evictable=False)), m.budget(device),
                              m.host_budget, m.host_used() + max(0, int(self.host_pending())),
                              for_what=f"job {job.id} ({job.kind} of {job.model})",
                              how=job.kind, fix=job_fix(job))

    def _admit(self, job: Job) -> bool:
        """Whether ``job`` (given a slot by ``next_to_start``) may start now: its reservation
        is charged (True); or its room is being made (``make_room``), or it waits for memory
        with the reason in its row (False)."""
        need = self._need(job)
        if need is None:
            return True
        key, device = ("job", job.id), mem_device(job.device)
        if job.id in self._making_room:
            return False
        if job.id in self._charged:              # left from a room made: plan without it
            self._zero(job)
        plan = self._plan(job, need)
        if plan.ok and not plan.actions:
            self.memory.charge(key, device, need)
            self._charged[job.id] = device
            self._set_reason(job, "")
            return True
        if plan.ok and self.make_room is not None and job.id not in self._no_room:
            self.memory.charge(key, device, need)   # the room is this job's from now on
            self._charged[job.id] = device
            self._making_room.add(job.id)
            self._set_reason(job, "making room: " + ", ".join(f"{a.kind} {a.holder.label()}"
                                                              for a in plan.actions))
            self.make_room(plan, lambda ok=True: self.post(self._room_made, job, ok))
            return False
        self._set_reason(job, waiting_reason(need, device, plan))
        return False

    def _room_made(self, job: Job, ok) -> None:
        """``make_room`` is over (on the loop): the job starts if it fits now.  ``ok`` False
        or an error (the room was never made): it waits for memory freed, queued."""
        self._making_room.discard(job.id)
        if job.state is not Q:
            self._release(job)
            return
        if ok is not True:
            self._no_room.add(job.id)             # not again until memory is freed
            if isinstance(ok, Exception):
                self._log(job, f"the room was not made: {ok}")
        if job.id in self._charged:
            self._zero(job)
        self.schedule()

    def _zero(self, job: Job) -> None:
        """``job``'s reservation (a room made) is 0 again, to plan without it; the listeners
        the manager runs for that must not count it as memory freed (else a room that could
        not be made would be tried again at once, for ever)."""
        self._quiet = True
        try:
            self.memory.charge(("job", job.id), self._charged[job.id], 0)
        finally:
            self._quiet = False

    def _set_reason(self, job: Job, reason: str) -> None:
        """A queued job's reason (waiting for memory...); logged when its kind changes (not
        each time the free bytes do)."""
        if job.reason != reason:
            if reason and reason.partition(":")[0] != job.reason.partition(":")[0]:
                self._log(job, reason)
            job.reason = reason
            self._changed(job)

    def _measured(self, job: Job, value) -> None:
        """The worker measured ``value`` bytes (its peak, rank 0's): the reservation follows
        (times the ranks) and the estimator learns."""
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return
        total = value * max(1, int(job.spec.get("nproc") or 1))
        if job.mem_bytes is not None and total <= job.mem_bytes:
            return
        job.mem_bytes = total
        if self.memory is None:
            return
        if job.id in self._charged:
            self.memory.charge(("job", job.id), self._charged[job.id], total)
        if job.mem_estimate:
            self.memory.estimator.learn(estimator_key(job), job.mem_estimate, total)

    def _release(self, job: Job) -> None:
        """Give back ``job``'s reservation (its worker ended, or it left the queue)."""
        self._making_room.discard(job.id)
        if self._charged.pop(job.id, None) is not None:
            self.memory.uncharge(("job", job.id))

    def _on_freed(self) -> None:
        """Memory was freed (a listener of the manager's): look again, on a later turn of the
        loop, so that whoever freed it (a load waiting for the room) takes it first.  The
        manager calls it after an uncharge and after a charge that leaves fewer bytes on a
        device (measured below the estimate, swapped to the host tier)."""
        if not self._quiet:
            self._freed_clear = True
        if not self._freed_posted:
            self._freed_posted = True
            self.post(self._freed)

    def _freed(self) -> None:
        self._freed_posted = False
        if self.stopping:
            return
        if self._freed_clear:
            self._freed_clear = False
            self._no_room.clear()
        for job in sorted((j for j in self.jobs.values() if j.state is P and j.preempted
                           and j.id not in self._held and j.id in self.hooks),
                          key=lambda j: (-j.priority, j.id)):
            need = self._need(job)
            if need is not None and not self._fits_now(job, need):
                continue
            job.transition(Q, "")
            job.preempted = False
            self._log(job, "memory is free again: queued, to resume"
                      + (f" from the checkpoint of step {job.checkpoint_step}" if job.checkpoint_step else ""))
            self._changed(job)
            self.schedule()
        self.schedule()

    def _fits_now(self, job: Job, need: int) -> bool:
        plan = self._plan(job, need)
        return plan.ok and not plan.actions

    def preempt(self, job_id: int, reason: str, on_done: Callable | None = None) -> None:
        """Pause running preemptible job ``job_id`` to make room for a load (the instance
        manager carries out a plan's "pause" action): it checkpoints and its worker exits; it
        is then paused with ``reason`` ("preempted: room for ..."), its memory given back, and
        ``on_done(True)`` runs on the loop.  When memory is freed later and its room is there
        again, it is queued to resume.  ``on_done(False)``: it holds nothing it could give (not
        preemptible, or no such job).  A job with no worker holds nothing: ``on_done(True)``."""
        job = self.jobs.get(job_id)
        done = on_done or (lambda ok: None)
        if job is None or job.state not in ACTIVE:
            self.post(done, job is None or job.id not in self._charged)
            return
        if not job.preemptible and job.stop is None:
            self.post(done, False)
            return
        if job.stop is not None and job.state not in (Q, P):
            # pausing or cancelling already (a user's pause stays a user's): wait for its end
            self.waiters.setdefault(job.id, []).append(lambda j: done(True))
            return
        if job.state is R and job.stop is None:
            job.preempted = True
            self._preempt_reason[job.id] = reason if reason.startswith("preempted") else f"preempted: {reason}"
            self._log(job, f"{self._preempt_reason[job.id]}: pausing it (checkpoint)")
        self.stop(job, "pause", lambda j: done(True))


def job_fix(job: Job) -> str:
    """How a train or finetune job could need less memory, in its own command's flags (train
    has no --method; a fine-tune that is already LoRA gains nothing from it)."""
    smaller = "a smaller --batch-size or --block-size"
    if job.kind == "finetune":
        method = job.spec.get("method") if isinstance(job.spec, dict) else None
        if method == "full":                   # the daemon's default is lora already
            return f"fine-tune with --method lora (only the adapter is trained), or {smaller}"
        return smaller
    if job.kind == "train":
        return f"train with {smaller}, or a smaller model (--layers, --dim)"
    return "need less memory"


def waiting_reason(need: int, device: str, plan) -> str:
    """A queued job's reason when its reservation does not fit."""
    return (f"waiting for memory: needs {size_text(need)} on {device}, {size_text(plan.free)} "
            f"free of {size_text(plan.budget)}")
