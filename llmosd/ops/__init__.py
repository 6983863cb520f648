"""Request handlers: one ``op_<type>`` method per protocol message type, split by domain
(``store``, ``serve``, ``jobs`` and ``jobctl``; the session's own messages are here).

Handlers run on the control loop thread and must return quickly: anything slow is handed to
the instance manager (loader/engine threads) or the job runner (worker processes).  Nothing
in this package imports torch.
"""
from __future__ import annotations

import logging
import os
import time

import llmosd
from llmctl import protocol
from llmctl.errors import ShuttingDown, UnsupportedVersion
from llmosd.ops.admin import AdminOps
from llmosd.ops.export import ExportOps
from llmosd.ops.jobctl import JobCtlOps
from llmosd.ops.jobs import JobOps
from llmosd.ops.serve import ServeOps
from llmosd.ops.store import StoreOps
from llmosd.server import Ctx, Server
from llmosd.store.uploads import Sources

log = logging.getLogger("llmosd.ops")


class Ops:
    """Routes each request to its domain's handler; answers hello, ping, status, ps, cancel,
    metrics."""

    def __init__(self, cfg, store, manager, jobs, uploads):
        self.cfg, self.store, self.manager, self.jobs = cfg, store, manager, jobs
        uploads.max_open = cfg.max_uploads
        uploads.max_per_owner = cfg.max_uploads_per_client
        self.started = time.time()
        sources = Sources(store)      # what re-imports need not send
        self.store_ops = StoreOps(store, manager, jobs, uploads, sources)
        self.job_ops = JobOps(store, manager, jobs, sources)
        self.jobctl_ops = JobCtlOps(store, jobs)
        self.serve_ops = ServeOps(cfg, store, manager)
        self.export_ops = ExportOps(store)
        for h in (self.store_ops, self.job_ops, self.jobctl_ops):    # admin_group, quotas
            h.cfg = cfg
        self.routes = {name[3:]: getattr(h, name)
                       for h in (self, self.store_ops, self.job_ops, self.jobctl_ops, self.serve_ops,
                                 self.export_ops, AdminOps(self))
                       for name in dir(h) if name.startswith("op_")}
        missing = set(protocol.SCHEMAS) - set(self.routes)
        assert not missing, f"no handler for {missing}"
        self.metrics = None        # main calls attach(server) once the server exists

    def attach(self, server: Server) -> None:
        """Bind the server's metrics to this daemon's state, and serve them on
        127.0.0.1:``metrics_port`` when the config sets one (a port that cannot be bound is
        logged, not fatal: the socket still serves them).  Idempotent."""
        if self.metrics is server.metrics:
            return
        self.metrics = server.metrics
        self.metrics.bind(self.metrics_state)
        port = getattr(self.cfg, "metrics_port", 0) or 0
        if port:
            try:
                self.metrics.serve_http(int(port), server.post)
            except OSError as e:
                log.error("metrics: cannot serve on 127.0.0.1:%s: %s", port, e.strerror or e)

    def dispatch(self, ctx: Ctx) -> None:
        self.routes[ctx.type](ctx)

    def peer_gone(self, peer) -> None:
        self.store_ops.peer_gone(peer)
        n = self.manager.cancel_client(peer.ident)    # its score/embed/classify calls too
        if n:
            log.info("%r went away; cancelled %d request(s)", peer, n)

    # -- session --------------------------------------------------------------------------
    def op_hello(self, ctx: Ctx) -> None:
        if ctx.body["version"] != protocol.VERSION:
            raise UnsupportedVersion(f"client speaks protocol {ctx.body['version']}, "
                                     f"llmosd speaks {protocol.VERSION}")
        ctx.ok({"daemon": "llmosd", "version": llmosd.__version__, "protocol": [protocol.VERSION, protocol.MINOR],
                "pid": os.getpid(), "max_message_bytes": self.cfg.max_message_bytes})

    def op_ping(self, ctx: Ctx) -> None:
        ctx.ok({"time": time.time()})

    def op_status(self, ctx: Ctx) -> None:
        table = self.manager.table
        body = {
            "version": llmosd.__version__, "protocol": [protocol.VERSION, protocol.MINOR],
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
            "socket": self.cfg.socket, "state_dir": self.cfg.state_dir,
            "device": str(self.manager.device), "dtype": str(self.manager.dtype).replace("torch.", ""),
            "threads": self.cfg.torch_threads(), "models": len(self.store.list()),
            "instances": len(table), "active_requests": sum(i.active_requests for i in table),
            "tokens_served": sum(i.tokens_served for i in table),
            "resident_bytes": sum(i.resident_bytes for i in table),
            "rss_bytes": _rss(), "jobs": self._job_rows(), "devices": self._devices(),
            "engines": [engine_row(i) for i in table],
        }
        ctx.ok(body)

    def op_metrics(self, ctx: Ctx) -> None:
        """The Prometheus text exposition of ``ctx.server``'s registry."""
        self.attach(ctx.server)
        ctx.ok({"text": self.metrics.render()})

    def metrics_state(self) -> dict:
        """What the gauges show (read on the loop at each render): the table's rows, the
        devices' memory rows, and every job's row (``metrics`` keeps the recent ones)."""
        return {"instances": self.manager.table.rows(), "devices": self._devices(),
                "jobs": [j.row() for _, j in sorted(self.jobs.jobs.items())]}

    def op_ps(self, ctx: Ctx) -> None:
        ctx.ok({"instances": self.manager.table.rows(), "jobs": self._job_rows(),
                "evicted": self.manager.memory.recent_evictions()})

    def _devices(self) -> list[dict]:
        """Per device: budget, bytes used by instances, by jobs, reserved (KV cache, loads),
        free, and the host tier's budget and use (the memory manager's rows).  The cpu's row
        also has ``process_rss`` (the daemon's RSS) and ``other``: what of it the ledger does
        not charge (the daemon itself, torch, caches), so the gap is seen."""
        holders = self.manager.holders()
        by_device: dict = {}
        for h in holders:
            by_device.setdefault(h.device, []).append(h)
        rows = self.manager.memory.usage_rows(by_device)
        for row in rows:
            if row["device"] == "cpu":
                row.update(rss_rows(row, _rss()))
        return rows

    def _job_rows(self) -> list[dict]:
        """The jobs not finished (queued, running, pausing, paused), as job rows."""
        return [j.row() for _, j in sorted(self.jobs.jobs.items()) if not j.is_finished()]

    def op_cancel(self, ctx: Ctx) -> None:
        stream = ctx.peer.streams.get(ctx.body["target"])
        if stream is not None:
            stream.cancel("cancelled by the client")
        ctx.ok({"cancelled": stream is not None})

    # -- shutdown -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """SIGTERM: every open stream gets a clean error; running training jobs (train,
        finetune) pause (to resume at the next start), other jobs are cancelled; instances
        unload."""
        self.job_ops.stopping = True
        if self.metrics is not None:
            self.metrics.stop_http()
        self.jobctl_ops.shutdown()
        self.jobs.shutdown()
        self.manager.shutdown(ShuttingDown("llmosd is shutting down; the request was cancelled"))


def engine_row(inst) -> dict:
    """An instance's engine as ``status`` lists it (issue 13): its id, model, state, how its
    weights are held, its KV pool's blocks and its queue."""
    return {"id": inst.id, "model": inst.model, "state": inst.state.value, **inst.kv_row()}


def rss_rows(cpu: dict, rss: int) -> dict:
    """``process_rss`` and ``other`` of the cpu's devices row: RSS less what the ledger
    charges in this process's RAM (instances and reservations on the cpu, the host tier;
    jobs run in worker processes of their own)."""
    charged = (cpu.get("instances") or 0) + (cpu.get("reserved") or 0) + (cpu.get("host_used") or 0)
    return {"process_rss": rss, "other": max(0, rss - charged)}


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
