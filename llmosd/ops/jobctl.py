"""Handlers that look at and steer jobs: jobs, job, job_rm, job_cancel, job_pause, job_resume
and job_logs (protocol 1.5).  Making jobs is ``ops.jobs``; running them ``jobs.runner``."""
from __future__ import annotations

import logging
import threading

from llmctl.errors import Cancelled, JobNotFound, ShuttingDown
from llmosd import access
from llmosd.jobs.queue import Job
from llmosd.ops.store import write_error
from llmosd.server import Ctx

log = logging.getLogger("llmosd.ops")


def public_spec(spec: dict) -> dict:
    """The spec as ``job`` shows it: without the daemon's own keys (``_parent``...) and the
    data map (shown on its own), bytes (a create's text) by their length."""
    from llmosd.jobs.records import json_safe
    return json_safe({k: v for k, v in spec.items() if not str(k).startswith("_") and k != "data"})


def job_row(job: Job) -> dict:
    """The job row with ``metrics``: the job's last metrics map (a fine-tune's validation
    figures: val_ppl, exact_match, chrf, accuracy, f1...; an eval's result: {metrics,
    examples, loss?}), None before any."""
    from llmosd.jobs.records import json_safe
    return {**job.row(), "metrics": json_safe(job.metrics) if job.metrics else None}


class JobCtlOps:
    """``op_<type>`` for the job listing and control messages.  Changing a job (rm, cancel,
    pause, resume) is for its owner and administrators (``access.may``: root, the daemon's own
    user, the config's ``admin_group``: ``cfg``, set by whoever builds this)."""

    cfg = None

    def __init__(self, store, jobs):
        self.store, self.jobs = store, jobs
        self.followers: set = set()          # the open job_logs streams (ended at shutdown)

    def _job(self, ctx: Ctx, change: str = "") -> Job:
        """The job ``ctx`` names; with ``change`` (an action of ``access.ACTIONS``: cancel,
        pause, resume, job_rm), PermissionDenied unless ``ctx``'s uid may do it."""
        job_id = ctx.body["job"]
        job = self.jobs.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"there is no job {job_id}")
        if change:
            access.check(ctx.uid, change, job.owner, self.cfg, thing=f"job {job.id}")
        return job

    def op_jobs(self, ctx: Ctx) -> None:
        every = ctx.body.get("all", False)
        ctx.ok({"jobs": [job_row(j) for _, j in sorted(self.jobs.jobs.items())
                         if every or not j.is_finished()]})

    def op_job(self, ctx: Ctx) -> None:
        job = self._job(ctx)
        ctx.ok({"job": job_row(job), "spec": public_spec(job.spec), "data": dict(job.data)})

    def op_job_cancel(self, ctx: Ctx) -> None:
        """Answered once the job has stopped (at once when no worker runs)."""
        job = self._job(ctx, change="cancel")
        log.info("job %d (%s %s): cancel by uid %s", job.id, job.kind, job.model, ctx.uid)
        self.jobs.stop(job, "cancel", lambda j: ctx.ok({"job": j.row()}))

    def op_job_pause(self, ctx: Ctx) -> None:
        """Answered once the worker has checkpointed and stopped (or was killed)."""
        job = self._job(ctx, change="pause")
        log.info("job %d (%s %s): pause by uid %s", job.id, job.kind, job.model, ctx.uid)
        self.jobs.stop(job, "pause", lambda j: ctx.ok({"job": j.row()}))

    def op_job_resume(self, ctx: Ctx) -> None:
        job = self._job(ctx, change="resume")
        self.jobs.resume(job)
        log.info("job %d (%s %s): resumed by uid %s", job.id, job.kind, job.model, ctx.uid)
        ctx.ok({"job": job.row()})

    def op_job_rm(self, ctx: Ctx) -> None:
        """Delete a finished job's directory; then its data blobs go unless a model or another
        job still names them."""
        job = self._job(ctx, change="job_rm")
        refs = set(job.refs)

        def removed(_, error):
            if error is not None:
                ctx.error(write_error(f"removing job {job.id}", error))
                return
            self.store.writer.submit(self.store.discard_unreferenced, released, refs)

        def released(_, error):
            if error is not None:
                log.warning("job %d: releasing its data blobs failed: %s", job.id, error)
            log.info("job %d removed by uid %s", job.id, ctx.uid)
            ctx.ok({"removed": job.id})
        self.jobs.remove(job, removed)

    # -- logs ---------------------------------------------------------------------------------
    def op_job_logs(self, ctx: Ctx) -> None:
        """Stream the stored log lines and metrics (read off the loop), then, with ``follow``,
        the live ones and state changes until the job finishes; end with the job's row.  What
        happens while the stored part is read is held back and sent after it, so nothing is
        lost or repeated."""
        job = self._job(ctx)
        follow = ctx.body.get("follow", False) and not job.is_finished()
        sizes = self.jobs.records.sizes(job.id)
        held: list[dict] | None = []            # None once the stored part is out

        def live(chunk: dict, j: Job) -> None:
            if held is not None:
                held.append(chunk)
                return
            stream.chunk(chunk)
            if "row" in chunk and j.is_finished():
                end()

        def end() -> None:
            self.jobs.unsubscribe(job.id, live)
            self.followers.discard(stop)
            stream.end({"job": job_row(job)})

        def stop(err) -> None:                   # the client cancelled, left, or we stop
            self.jobs.unsubscribe(job.id, live)
            self.followers.discard(stop)
            stream.error(err)

        def replay(chunks: list[dict]) -> None:  # on the loop
            nonlocal held
            if stream.closed:
                return
            for c in chunks:
                stream.chunk(c)
            pending, held = held, None
            for c in pending:
                live(c, job)
                if stream.closed:
                    return
            if not follow or job.is_finished():
                end()

        def read() -> None:
            try:
                chunks = self.jobs.records.read_events(job.id, sizes)
            except OSError as e:
                chunks = [{"line": f"(the stored log could not be read: {e})"}]
            self.jobs.post(replay, chunks)

        stream = ctx.stream(lambda reason: stop(Cancelled(f"job_logs of job {job.id}: {reason}")))
        if follow:
            self.jobs.subscribe(job.id, live)
            self.followers.add(stop)
        threading.Thread(target=read, name=f"job-{job.id}-logs", daemon=True).start()

    def shutdown(self) -> None:
        for stop in list(self.followers):
            stop(ShuttingDown("llmosd is shutting down"))
