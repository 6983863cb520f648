"""Request handlers: one ``op_<type>`` method per protocol message type.

Handlers run on the control loop thread and must return quickly: anything slow is handed to
the instance manager (loader/engine threads) or the job runner (worker processes).
"""
from __future__ import annotations

import json
import os
import time

import llmosd
from llmctl import protocol
from llmctl.errors import (AlreadyExists, Busy, Cancelled, Internal, InvalidArgument, JobFailed,
                           LlmosdError, ModelNotFound, ShuttingDown, UnsupportedVersion)
from .create import check_spec
from .engine import Request
from .instances import InstanceManager, Task, check_generate
from .jobs import JobRunner, JobState
from .sampling import SamplingParams
from .server import Ctx
from .store import Store, parse_ref
from .uploads import Uploads
from .table import State


class Ops:
    def __init__(self, cfg, store: Store, manager: InstanceManager, jobs: JobRunner,
                 uploads: Uploads):
        self.cfg, self.store, self.manager, self.jobs = cfg, store, manager, jobs
        self.uploads = uploads
        self.started = time.time()
        self.jobs_stopping = False

    def dispatch(self, ctx: Ctx) -> None:
        getattr(self, "op_" + ctx.type)(ctx)

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
            "rss_bytes": _rss(), "jobs": [j.row() for j in self.jobs.jobs.values()],
        }
        ctx.ok(body)

    # -- the table ------------------------------------------------------------------------
    def op_ps(self, ctx: Ctx) -> None:
        ctx.ok({"instances": self.manager.table.rows(),
                "jobs": [j.row() for j in self.jobs.jobs.values()]})

    def op_load(self, ctx: Ctx) -> None:
        canon, man, digest = self.store.get(ctx.body["model"])
        t0 = time.perf_counter()

        def ready(inst, err):
            if err:
                ctx.error(err)
            else:
                ctx.ok({**inst.row(), "load_ms": round((time.perf_counter() - t0) * 1000, 3)})
        self.manager.acquire(canon, man, digest, ctx.uid, ready)

    def op_unload(self, ctx: Ctx) -> None:
        target, force = ctx.body["target"], ctx.body.get("force", False)
        if target.isdigit():
            insts = [self.manager.table.get(int(target))]
        else:
            canon = "%s:%s" % parse_ref(target)
            insts = [i for i in self.manager.table if i.model == canon]
            if not insts:
                raise ModelNotFound(f"{canon} is not loaded", hint="run 'llmctl ps' to see what is loaded")
        if not force:                 # check all first so a refusal unloads nothing
            for inst in insts:
                if inst.state is not State.FAILED:
                    self.manager.check_unloadable(inst)
        ids = [i.id for i in insts]
        pending = set(ids)

        def done(iid):
            pending.discard(iid)
            if not pending:
                ctx.ok({"unloaded": ids})
        for inst in insts:
            self.manager.unload(inst, force, lambda iid=inst.id: done(iid))

    # -- the store ------------------------------------------------------------------------
    def _loaded_ids(self, canon: str) -> list[int]:
        return [i.id for i in self.manager.table if i.model == canon]

    def op_ls(self, ctx: Ctx) -> None:
        models = []
        for ref, digest, man in self.store.list():
            lin = man.get("lineage") or {}
            models.append({"model": ref, "digest": digest, "size": self.store.size(man),
                           "parameters": man.get("parameters"), "created": man.get("created"),
                           "modified": man.get("_mtime"), "architecture": man.get("architecture"),
                           "method": lin.get("method"), "parent": lin.get("parent"),
                           "instances": self._loaded_ids(ref)})
        ctx.ok({"models": models})

    def op_show(self, ctx: Ctx) -> None:
        canon, man, digest = self.store.get(ctx.body["model"])
        config = json.loads(self.store.read_blob(man["config"]["digest"]))
        ctx.ok({"model": canon, "digest": digest, "manifest": man, "config": config,
                "size": self.store.size(man),
                "instances": [i.row() for i in self.manager.table if i.model == canon]})

    def op_rm(self, ctx: Ctx) -> None:
        canon = "%s:%s" % parse_ref(ctx.body["model"])
        ids = self._loaded_ids(canon)
        if ids:
            raise Busy(f"{canon} is loaded (instance {', '.join(map(str, ids))})",
                       hint=f"unload it first: llmctl unload {canon}")
        if any(j.target == canon for j in self.jobs.jobs.values()):
            raise Busy(f"{canon} is being written by a running job")
        ctx.ok(self.store.remove(canon))

    def op_tag(self, ctx: Ctx) -> None:
        src = "%s:%s" % parse_ref(ctx.body["source"])
        self.store.get(src)
        dst = "%s:%s" % parse_ref(ctx.body["target"])
        if dst == src:
            raise InvalidArgument("source and target are the same model")
        if self._loaded_ids(dst):
            raise Busy(f"{dst} is loaded; unload it before replacing it")
        canon = self.store.copy(src, dst)
        _, _, digest = self.store.get(canon)
        ctx.ok({"model": canon, "source": src, "digest": digest})

    def op_create(self, ctx: Ctx) -> None:
        spec = dict(ctx.body)
        try:
            check_spec(spec)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self._job(ctx, "create", "llmosd.create:create", spec)

    def op_import(self, ctx: Ctx) -> None:
        spec = dict(ctx.body)
        files = spec["files"]
        fmt = spec["format"] = spec.get("format") or "hf"
        if fmt not in ("hf", "gguf"):
            raise InvalidArgument(f"import format {fmt!r} is not supported by this llmosd",
                                  hint="import a Hugging Face directory or a .gguf file")
        if fmt == "gguf" and len(files) != 1:
            raise InvalidArgument(f"a gguf import takes exactly one file, got {len(files)}")
        for rel, digest in files.items():
            if not isinstance(rel, str) or not isinstance(digest, str) or "/" in rel or rel.startswith("."):
                raise InvalidArgument(f"files: bad entry {rel!r}")
            if not self.store.has_blob(digest):
                raise InvalidArgument(f"files: {rel} ({digest}) has not been uploaded",
                                      hint="upload each file with 'upload'/'upload_chunk' first")
        self._job(ctx, "import", "llmosd.importer:import_model", spec, cleanup=set(files.values()))

    def _job(self, ctx: Ctx, kind: str, func: str, spec: dict, cleanup: set | None = None) -> None:
        """Run a job that makes model ``spec['name']``; publish its manifest when it returns."""
        name, tag = parse_ref(spec.pop("name"))
        canon, force = f"{name}:{tag}", spec.pop("force", False)
        try:
            self.store.get(canon)
            if not force:
                raise AlreadyExists(f"model {canon} already exists",
                                    hint="choose another name, or pass --force to replace it")
        except ModelNotFound:
            pass
        if self._loaded_ids(canon):
            raise Busy(f"{canon} is loaded; unload it before replacing it")
        if any(j.target == canon for j in self.jobs.jobs.values()):
            raise Busy(f"a job is already writing {canon}")
        job_ref = []
        stream = ctx.stream(lambda reason: self.jobs.cancel(job_ref[0].id))

        def progress(job, p):
            job.progress = p
            stream.chunk(p)

        def done(job, manifest, error):
            try:
                publish(job, manifest, error)
            finally:
                if cleanup:                       # raw uploads: no longer needed either way
                    self.store.discard_unreferenced(cleanup)

        def publish(job, manifest, error):
            if job.state is JobState.CANCELLED:
                stream.error(ShuttingDown("llmosd is shutting down") if self.jobs_stopping
                             else Cancelled(f"{kind} of {canon} was cancelled"))
                return
            if error:
                cls = InvalidArgument if error["invalid"] else JobFailed
                stream.error(cls(f"{kind} of {canon} failed: {error['message']}"))
                return
            try:
                digest = self.store.write_manifest(canon, manifest, replace=force)
            except LlmosdError as e:
                stream.error(e)
                return
            stream.end({"model": canon, "digest": digest, "parameters": manifest["parameters"],
                        "size": self.store.size(manifest), "job": job.id})
        job_ref.append(self.jobs.start(kind, canon, func, spec, ctx.uid, progress, done))

    # -- uploads --------------------------------------------------------------------------
    def op_upload(self, ctx: Ctx) -> None:
        have = self.uploads.begin(ctx.body["digest"], ctx.body["size"])
        ctx.ok({"have": have})

    def op_upload_chunk(self, ctx: Ctx) -> None:
        def done(body, err):
            if err:
                ctx.error(Internal(f"storing the upload failed: {err}"))
            else:
                ctx.ok(body)
        body = self.uploads.chunk(ctx.body["digest"], ctx.body["offset"], ctx.body["data"], done)
        if body is not None:
            ctx.ok(body)

    # -- generation -----------------------------------------------------------------------
    def op_generate(self, ctx: Ctx) -> None:
        body = ctx.body
        opts = check_generate(body, self.cfg.default_max_tokens)
        sp = SamplingParams(temperature=float(body.get("temperature", 0.8)),
                            top_k=body.get("top_k", 0), top_p=float(body.get("top_p", 1.0)),
                            seed=body.get("seed"))
        try:
            sp.validate()
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        canon, man, digest = self.store.get(body["model"])
        key = (ctx.peer.ident, ctx.rid)
        req = Request(key, body["prompt"], opts["max_tokens"], sp, opts["stops"],
                      add_bos=body.get("add_bos", True))
        task = Task(req, ctx.stream(lambda reason: self.manager.cancel(key, reason)))
        self.manager.tasks[key] = task
        t0 = time.perf_counter()

        def ready(inst, err):
            if self.manager.tasks.get(key) is not task:
                return                                   # cancelled while loading
            if err:
                self.manager.tasks.pop(key)
                task.stream.error(err)
                return
            task.extra = {"loaded": was_loading, "load_ms": round((time.perf_counter() - t0) * 1000, 3)
                          if was_loading else 0.0}
            self.manager.submit(inst, task)
        existing = self.manager.table.usable(canon, digest)
        was_loading = existing is None or existing.state is State.LOADING
        self.manager.acquire(canon, man, digest, ctx.uid, ready)

    def op_cancel(self, ctx: Ctx) -> None:
        stream = ctx.peer.streams.get(ctx.body["target"])
        if stream is not None:
            stream.cancel("cancelled by the client")
        ctx.ok({"cancelled": stream is not None})

    # -- shutdown -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """SIGTERM: every open stream gets a clean error, jobs stop, instances unload."""
        self.jobs_stopping = True
        self.jobs.cancel_all()
        for key, task in list(self.manager.tasks.items()):
            self.manager.tasks.pop(key)
            task.stream.error(ShuttingDown("llmosd is shutting down; the request was cancelled"))
            if task.running:
                task.inst.engine.cancel(key, "shutdown")
        self.manager.unload_all()


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
