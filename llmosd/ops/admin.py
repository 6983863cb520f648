"""Handlers for the administrator's messages: ``fsck`` (protocol 1.8).

``fsck`` checks the store (``store.fsck``) on a short thread: hashing every blob may take
minutes, and neither the control loop nor the store writer (which publishes manifests) may
wait for it.  One runs at a time.  With ``repair``, orphans and temp files are kept while a job
runs or an upload is open (they may be that work in progress): the report says so.
"""
from __future__ import annotations

import logging
import threading

from llmctl.errors import Busy, StoreCorrupt
from llmosd.server import Ctx
from llmosd.store.fsck import fsck, summary

log = logging.getLogger("llmosd.ops")

WRITING = ("running", "pausing")      # job states whose workers may be writing blobs


def busy_reason(jobs, uploads) -> str | None:
    """Why orphans and temp files may be work in progress now (None: nothing writes)."""
    active = sorted(j.id for j in jobs.jobs.values() if getattr(j.state, "value", j.state) in WRITING)
    if active:
        return f"job{'s' if len(active) > 1 else ''} {', '.join(map(str, active))} running"
    if uploads is not None and uploads.slots:
        return f"{len(uploads.slots)} upload(s) open"
    return None


class AdminOps:
    """``op_fsck``; built from the daemon's ``Ops`` (its store, jobs and uploads)."""

    def __init__(self, ops):
        self.store, self.jobs = ops.store, ops.jobs
        self.uploads = getattr(ops.store_ops, "uploads", None)
        self.running = False

    def op_fsck(self, ctx: Ctx) -> None:
        """The report (``store.fsck``) as the ``ok`` body, once the check is done."""
        if self.running:
            raise Busy("an fsck is already running", hint="wait for it to finish")
        repair = bool(ctx.body.get("repair", False))
        busy = busy_reason(self.jobs, self.uploads) if repair else None
        self.running = True
        log.info("fsck%s by uid %s", " --repair" if repair else "", ctx.uid)
        post = ctx.server.post if getattr(ctx, "server", None) is not None else None

        def work():
            try:
                report, err = fsck(self.store, repair=repair, busy=busy), None
            except OSError as e:
                report, err = None, StoreCorrupt(f"fsck could not read the store: {e.strerror or e}",
                                                 hint="check the state directory's permissions and disk")
            except Exception as e:                # reported, never a dead thread and a silent client
                log.exception("fsck failed")
                report, err = None, StoreCorrupt(f"fsck failed: {e}")
            if post is None:
                self._done(ctx, report, err)
            else:
                post(self._done, ctx, report, err)
        if post is None:
            work()
        else:
            threading.Thread(target=work, name="fsck", daemon=True).start()

    def _done(self, ctx: Ctx, report: dict | None, err) -> None:
        self.running = False
        if err is not None:
            ctx.error(err)
            return
        log.info("%s", summary(report))
        for p in report["problems"]:
            log.info("fsck: %s %s: %s (%s)", p["kind"], p["what"], p["detail"], p["action"])
        ctx.ok(report)
