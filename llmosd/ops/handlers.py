"""Request handlers: one ``op_<type>`` method per protocol message type.

Handlers run on the control loop thread and must return quickly: anything slow is handed to
the instance manager (loader/engine threads) or the job runner (worker processes).
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import time

import llmosd
from llmctl import protocol
from llmctl.errors import (AlreadyExists, Busy, Cancelled, InstanceNotFound, InvalidArgument,
                           JobFailed, LlmosdError, ModelNotFound, ShuttingDown, StoreCorrupt,
                           UnsupportedVersion)
from llmosd.train.create import check_spec
from llmosd.serve.chat import TemplateError, check_messages
from llmosd.serve.engine import Call, Request
from llmosd.serve.instances import InstanceManager, Task, check_generate
from llmosd.jobs.runner import JobRunner, JobState
from llmosd.serve.sampling import SamplingParams
from llmosd.server import Ctx
from llmosd.store.store import Store, parse_ref
from llmosd.store.uploads import Sources, Uploads
from llmosd.table import State

log = logging.getLogger("llmosd.ops")


SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                     "repetition_penalty": 1.0}
MAX_BATCH_INPUTS = 256


class _Reply:
    """A task's answer as one ``ok``/``error`` reply (score, embed, classify), not a stream."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def end(self, body: dict) -> None:
        self.ctx.ok(body)

    def error(self, err) -> None:
        self.ctx.error(err)


class Ops:
    def __init__(self, cfg, store: Store, manager: InstanceManager, jobs: JobRunner,
                 uploads: Uploads):
        self.cfg, self.store, self.manager, self.jobs = cfg, store, manager, jobs
        self.uploads = uploads
        uploads.max_open = getattr(cfg, "max_uploads", uploads.max_open)
        uploads.max_per_owner = getattr(cfg, "max_uploads_per_client", uploads.max_per_owner)
        self.started = time.time()
        self.jobs_stopping = False
        self._hooked = False
        self.sources = Sources(store)      # what re-imports need not send

    def dispatch(self, ctx: Ctx) -> None:
        if not self._hooked and getattr(ctx, "server", None) is not None:
            ctx.server.on_peer_gone.append(self._peer_gone)
            self._hooked = True
        getattr(self, "op_" + ctx.type)(ctx)

    def _peer_gone(self, peer) -> None:
        n = self.uploads.release(peer.ident)
        if n:
            log.info("%r went away; dropped its %d open upload(s)", peer, n)

    def _get(self, ref: str) -> tuple[str, dict, str]:
        """store.get, with "did you mean" for a mistyped name (the store is listed only then)."""
        try:
            return self.store.get(ref)
        except ModelNotFound as e:
            raise ModelNotFound(e.message, hint=self._did_you_mean(ref)) from None

    def _did_you_mean(self, ref: str) -> str:
        canon = "%s:%s" % parse_ref(ref)
        refs = [r for r, _, _ in self.store.list()]
        close = difflib.get_close_matches(canon, refs, n=1, cutoff=0.6)
        if close:
            return f"did you mean {close[0].removesuffix(':latest')}? ('llmctl ls' lists the models)"
        return ModelNotFound.default_hint

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
        canon, man, digest = self._get(ctx.body["model"])
        t0 = time.perf_counter()
        existing = self.manager.table.usable(canon, digest)
        already = existing is not None and existing.serving

        def ready(inst, err):
            if err:
                ctx.error(err)
                return
            if not already:
                log.info("load %s by uid %s (instance %d)", canon, ctx.uid, inst.id)
            ctx.ok({**inst.row(), "load_ms": round((time.perf_counter() - t0) * 1000, 3),
                    "already_loaded": already})
        self.manager.acquire(canon, man, digest, ctx.uid, ready)

    def op_unload(self, ctx: Ctx) -> None:
        target, force = ctx.body["target"], ctx.body.get("force", False)
        if target.isascii() and target.isdigit():
            if len(target) > 18:
                raise InstanceNotFound(f"no instance with id {target[:20]}...")
            insts = [self.manager.table.get(int(target))]
        else:
            canon = "%s:%s" % parse_ref(target)
            insts = [i for i in self.manager.table if i.model == canon]
            if not insts:             # like 'systemctl stop' of a stopped unit: nothing to do
                self._get(canon)      # ...but a model that does not exist is an error
                ctx.ok({"unloaded": []})
                return
        if not force:                 # check all first so a refusal unloads nothing
            for inst in insts:
                if inst.state is not State.FAILED:
                    self.manager.check_unloadable(inst)
        ids = [i.id for i in insts]
        pending = set(ids)

        def done(iid):
            pending.discard(iid)
            if not pending:
                log.info("unload %s by uid %s (instance %s)", ", ".join(sorted({i.model for i in insts})),
                         ctx.uid, ", ".join(map(str, ids)))
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
        canon, man, digest = self._get(ctx.body["model"])
        config = json.loads(self.store.read_blob(man["config"]["digest"]))
        ctx.ok({"model": canon, "digest": digest, "manifest": man, "config": config,
                "size": self.store.size(man),
                "instances": [i.row() for i in self.manager.table if i.model == canon]})

    def op_rm(self, ctx: Ctx) -> None:
        canon, _, _ = self._get(ctx.body["model"])
        ids = self._loaded_ids(canon)
        if ids:
            raise Busy(f"{canon} is loaded (instance {', '.join(map(str, ids))})",
                       hint=f"unload it first: llmctl unload {canon}")
        if any(j.target == canon for j in self.jobs.jobs.values()):
            raise Busy(f"{canon} is being written by a running job")
        r = self.store.remove(canon)
        self.sources.changed()
        log.info("rm %s by uid %s (freed %s)", canon, ctx.uid, _size(r.get("freed_bytes", 0)))
        ctx.ok(r)

    def op_tag(self, ctx: Ctx) -> None:
        src, _, digest = self._get(ctx.body["source"])
        dst = "%s:%s" % parse_ref(ctx.body["target"])
        force = ctx.body.get("force", False)
        if dst == src:
            raise InvalidArgument("source and target are the same model")
        try:
            _, old, old_digest = self.store.get(dst)
        except ModelNotFound:
            old = old_digest = None
        if old_digest == digest:                      # already this model: nothing to do
            ctx.ok({"model": dst, "source": src, "digest": digest, "unchanged": True})
            return
        if old is not None:
            if not force:
                raise AlreadyExists(f"model {dst} already exists and is a different model",
                                    hint=f"pass --force to replace it (llmctl tag --force {src} {dst})")
            if self._loaded_ids(dst):
                raise Busy(f"{dst} is loaded; unload it before replacing it")
        canon = self.store.copy(src, dst, replace=force)   # frees a replaced model's blobs
        self.sources.changed()
        log.info("tag %s as %s by uid %s%s", src, canon, ctx.uid, " (replaced)" if old else "")
        ctx.ok({"model": canon, "source": src, "digest": digest})

    def op_create(self, ctx: Ctx) -> None:
        spec = dict(ctx.body)
        try:
            check_spec(spec)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        self._job(ctx, "create", "llmosd.train.create:create", spec)

    def op_import(self, ctx: Ctx) -> None:
        spec = dict(ctx.body)
        files = spec["files"]
        fmt = spec["format"] = spec.get("format") or "hf"
        if fmt not in ("hf", "gguf"):
            raise InvalidArgument(f"import format {fmt!r} is not supported by this llmosd",
                                  hint="import a Hugging Face directory or a .gguf file")
        if spec.get("dtype") not in (None, "auto", "float32", "float16", "bfloat16"):
            raise InvalidArgument(f"dtype {spec['dtype']!r} is not one of auto, float32, float16, bfloat16")
        if fmt == "gguf" and len(files) != 1:
            raise InvalidArgument(f"a gguf import takes exactly one file, got {len(files)}")
        for rel, digest in files.items():
            if not isinstance(rel, str) or not isinstance(digest, str) or "/" in rel or rel.startswith("."):
                raise InvalidArgument(f"files: bad entry {rel!r}")
            self.store.blob_path(digest)                  # a well-formed digest, or StoreCorrupt
        dtype = spec.get("dtype") or "auto"
        same = self.sources.same_import(files, fmt, dtype)
        if same is not None:
            self._reimport(ctx, same, spec)
            return
        try:
            missing = {rel: d for rel, d in files.items() if not self.store.has_blob(d)}
            known = {rel: d for rel, d in missing.items() if self.sources.models(d)}
            if known:                                     # we said "have" for them: ask for them
                self.sources.resend.update(known.values())
                rel, digest = next(iter(known.items()))
                raise InvalidArgument(
                    f"files: {', '.join(known)} were not sent because llmosd knew them as the source "
                    f"of {self.sources.models(digest)[0][0]}, but this import differs (other files "
                    "or dtype) and needs their content",
                    hint="run the import again: this time the files are sent")
            for rel, digest in missing.items():
                raise InvalidArgument(f"files: {rel} ({digest}) has not been uploaded",
                                      hint="upload each file with 'upload'/'upload_chunk' first")
            self._job(ctx, "import", "llmosd.formats.importer:import_model", spec, cleanup=set(files.values()),
                      lineage={"sources": dict(files), "dtype": dtype})
        except LlmosdError:                               # refused (name taken, busy...): no orphans
            self.store.discard_unreferenced(set(files.values()))
            raise

    def _reimport(self, ctx: Ctx, same: str, spec: dict) -> None:
        """Publish ``same``'s manifest as the new name at once (a copy, as tag makes)."""
        canon, force = "%s:%s" % parse_ref(spec["name"]), spec.get("force", False)
        if canon != same:
            self._check_target(canon, force)
            self.store.copy(same, canon, replace=force)
            self.sources.changed()
        self.store.discard_unreferenced(set(spec["files"].values()))     # uploads sent anyway
        _, man, digest = self.store.get(canon)
        log.info("import %s by uid %s (the same files as %s: copied, nothing converted)",
                 canon, ctx.uid, same)
        stream = ctx.stream(lambda reason: None)
        stream.end({"model": canon, "digest": digest, "parameters": man.get("parameters"),
                    "size": self.store.size(man), "job": None, "same_as": same})

    def _check_target(self, canon: str, force: bool) -> None:
        """Refuse to make ``canon`` when it exists (without force), is loaded, or is being made."""
        try:
            self.store.get(canon)
            if not force:
                raise AlreadyExists(f"model {canon} already exists",
                                    hint="choose another name, or pass --force to replace it")
        except ModelNotFound:
            pass
        self.store.check_free(canon, replace=force)    # a name/namespace clash, refused up front
        if self._loaded_ids(canon):
            raise Busy(f"{canon} is loaded; unload it before replacing it")
        if any(j.target == canon for j in self.jobs.jobs.values()):
            raise Busy(f"a job is already writing {canon}")

    def _job(self, ctx: Ctx, kind: str, func: str, spec: dict, cleanup: set | None = None,
             lineage: dict | None = None) -> None:
        """Run a job that makes model ``spec['name']``; publish its manifest when it returns.

        Whatever happens, the stream ends (``end`` or one error), and the blobs the job wrote and
        the raw uploads in ``cleanup`` go unless a manifest names them.
        ``lineage`` entries are added to the manifest's lineage args (what it was made from).
        """
        name, tag = parse_ref(spec.pop("name"))
        canon, force = f"{name}:{tag}", spec.pop("force", False)
        self._check_target(canon, force)
        job_ref = []
        stream = ctx.stream(lambda reason: self.jobs.cancel(job_ref[0].id))

        def progress(job, p):
            job.progress = p
            stream.chunk(p)

        def done(job, manifest, error):
            unneeded = set(cleanup or ()) | set(getattr(job, "blobs", ()))
            if isinstance(manifest, dict):
                unneeded |= self.store.blob_digests(manifest)
            try:
                publish(job, manifest, error)
            except Exception as e:                # never leave the client waiting
                log.exception("%s of %s: publishing failed", kind, canon)
                cls = StoreCorrupt if isinstance(e, OSError) else JobFailed
                stream.error(cls(f"{kind} of {canon} failed while publishing its manifest: "
                                 f"{getattr(e, 'strerror', None) or e}",
                                 hint="check the free space and permissions of the state directory, "
                                      "then run it again"))
            finally:
                try:
                    self.store.discard_unreferenced(unneeded)
                except Exception:
                    log.exception("%s of %s: cleaning up its blobs failed", kind, canon)

        def publish(job, manifest, error):
            if job.state is JobState.CANCELLED:
                stream.error(ShuttingDown("llmosd is shutting down") if self.jobs_stopping
                             else Cancelled(f"{kind} of {canon} was cancelled"))
                return
            if error:
                cls = InvalidArgument if error["invalid"] else JobFailed
                stream.error(cls(f"{kind} of {canon} failed: {error['message']}"))
                return
            if lineage:
                args = manifest.setdefault("lineage", {}).setdefault("args", {})
                for k, v in lineage.items():
                    args.setdefault(k, v)
            try:   # replacing (force) frees the old model's blobs no other manifest names
                digest = self.store.write_manifest(canon, manifest, replace=force)
            except LlmosdError as e:
                stream.error(e)
                return
            self.sources.changed()
            self.sources.resend.difference_update(set((lineage or {}).get("sources", {}).values()))
            size = self.store.size(manifest)
            log.info("%s %s by uid %s (%s)", kind, canon, job.uid, _size(size))
            stream.end({"model": canon, "digest": digest, "parameters": manifest["parameters"],
                        "size": size, "job": job.id})
        job_ref.append(self.jobs.start(kind, canon, func, spec, ctx.uid, progress, done))

    # -- uploads --------------------------------------------------------------------------
    def op_upload(self, ctx: Ctx) -> None:
        """Open an upload slot owned by the client, or answer ``have`` when nothing need be
        sent: the store has the blob, or a stored model was imported from that file."""
        digest, peer = ctx.body["digest"], ctx.peer
        self.store.blob_path(digest)                      # a well-formed digest
        if not self.store.has_blob(digest) and self.sources.known(digest):
            ctx.ok({"have": True})
            return
        try:
            have = self.uploads.begin(digest, ctx.body["size"], owner=peer.ident)
        finally:                           # an open slot keeps the client known (and beaten),
            if self.uploads.is_open(digest, peer.ident):   # so that its leaving frees it
                peer.holds.add(("upload", digest))
            else:
                peer.holds.discard(("upload", digest))
        ctx.ok({"have": have})

    def op_upload_chunk(self, ctx: Ctx) -> None:
        digest, peer = ctx.body["digest"], ctx.peer

        def done(body, err):
            if err:
                ctx.error(StoreCorrupt(f"storing the upload of {digest} failed: "
                                       f"{getattr(err, 'strerror', None) or err}",
                                       hint="free space in the state directory and try again"))
            else:
                ctx.ok(body)
        try:
            body = self.uploads.chunk(digest, ctx.body["offset"], ctx.body["data"], done, owner=peer.ident)
        finally:
            if not self.uploads.is_open(digest, peer.ident):   # finished or failed
                peer.holds.discard(("upload", digest))
        if body is not None:
            ctx.ok(body)

    def op_download(self, ctx: Ctx) -> None:
        """A piece of a blob a manifest refers to (export reads models this way)."""
        b = ctx.body
        if b["offset"] < 0 or not 0 < b["size"] <= protocol.UPLOAD_CHUNK:
            raise InvalidArgument(f"download: offset must be >= 0 and size in 1..{protocol.UPLOAD_CHUNK}")
        if not any(b["digest"] in self.store.blob_digests(man) for _, _, man in self.store.list()):
            raise ModelNotFound(f"no model in the store refers to blob {b['digest']}")
        data, total = self.store.read_range(b["digest"], b["offset"], b["size"])
        ctx.ok({"data": data, "total": total})

    # -- generation -----------------------------------------------------------------------
    def op_generate(self, ctx: Ctx) -> None:
        self._generate(ctx, prompt=ctx.body["prompt"], messages=None)

    def op_chat(self, ctx: Ctx) -> None:
        try:
            messages = check_messages(ctx.body["messages"])
        except TemplateError as e:
            raise InvalidArgument(str(e)) from None
        self._generate(ctx, prompt="", messages=messages)

    def _generate(self, ctx: Ctx, prompt: str, messages: list | None) -> None:
        body = ctx.body
        opts = check_generate(body, self.cfg.default_max_tokens)
        canon, man, digest = self._get(body["model"])
        # request settings > the model's own defaults (generation_config, GGUF) > ours
        d = {**SAMPLING_DEFAULTS, **{k: v for k, v in (man.get("defaults") or {}).items()
                                     if k in SAMPLING_DEFAULTS}}
        d.update({k: body[k] for k in SAMPLING_DEFAULTS if body.get(k) is not None})
        sp = SamplingParams(temperature=float(d["temperature"]), top_k=int(d["top_k"]),
                            top_p=float(d["top_p"]), min_p=float(d["min_p"]),
                            repetition_penalty=float(d["repetition_penalty"]), seed=body.get("seed"))
        try:
            sp.validate()
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        key = (ctx.peer.ident, ctx.rid)
        req = Request(key, prompt, opts["max_tokens"], sp, opts["stops"],
                      add_bos=body.get("add_bos", True), messages=messages, logprobs=opts["logprobs"])
        self._run_on_instance(ctx, canon, man, digest, key,
                              Task(req, ctx.stream(lambda reason: self.manager.cancel(key, reason))))

    def _run_on_instance(self, ctx: Ctx, canon: str, man: dict, digest: str, key, task: Task) -> None:
        """Load the model if needed, then hand ``task`` to its instance's engine.  A stream
        that must wait for a load first gets one empty chunk saying so (``loading``)."""
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
        if was_loading and isinstance(task.req, Request):
            first = {"text": "", "token_ids": [], "loading": canon}
            if task.req.logprobs:
                first["logprobs"] = []
            task.stream.chunk(first)
        self.manager.acquire(canon, man, digest, ctx.uid, ready)

    # -- evaluation -----------------------------------------------------------------------
    def op_score(self, ctx: Ctx) -> None:
        self._evaluate(ctx, "score", {"text": ctx.body["text"], "add_bos": ctx.body.get("add_bos", True)})

    def op_embed(self, ctx: Ctx) -> None:
        b = ctx.body
        if not all(isinstance(x, str) for x in b["inputs"]) or len(b["inputs"]) > MAX_BATCH_INPUTS:
            raise InvalidArgument(f"inputs must be a list of at most {MAX_BATCH_INPUTS} strings")
        self._evaluate(ctx, "embed", {"inputs": b["inputs"], "pooling": b.get("pooling", "mean"),
                                      "normalize": b.get("normalize", True)})

    def op_classify(self, ctx: Ctx) -> None:
        b = ctx.body
        if not all(isinstance(x, str) for x in b["inputs"]) or len(b["inputs"]) > MAX_BATCH_INPUTS:
            raise InvalidArgument(f"inputs must be a list of at most {MAX_BATCH_INPUTS} strings")
        if not all(isinstance(x, str) and x.strip() for x in b["labels"]) or len(b["labels"]) > 64:
            raise InvalidArgument("labels must be a list of at most 64 non-empty strings")
        self._evaluate(ctx, "classify", {"inputs": b["inputs"], "labels": b["labels"],
                                         "template": b.get("template")})

    def _evaluate(self, ctx: Ctx, name: str, args: dict) -> None:
        canon, man, digest = self._get(ctx.body["model"])
        key = (ctx.peer.ident, ctx.rid)
        self._run_on_instance(ctx, canon, man, digest, key, Task(Call(key, name, args), _Reply(ctx)))

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
            if task.running and isinstance(task.req, Request):
                task.inst.engine.cancel(key, "shutdown")
        self.manager.unload_all()


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _size(n: int) -> str:
    """A byte count for the log, e.g. '12.3 MB'."""
    if n < 1000:
        return f"{n} bytes"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"
