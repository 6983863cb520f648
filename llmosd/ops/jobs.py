"""Handlers for the jobs that make models: create, import and train (and, through the
``ops.finetune`` mixin, finetune, eval and merge); publishing their manifests.

Every one is a job of ``jobs.runner.JobRunner`` (queued, run in a worker, recorded).  create
and import stream their progress to the requesting client; train and finetune answer with the
job's row at once and go on without a client (they survive daemon restarts: ``adopt``).
"""
from __future__ import annotations

import json
import logging
from functools import partial
from typing import Callable

from llmctl import protocol
from llmctl.errors import (AlreadyExists, Busy, Cancelled, InvalidArgument, JobFailed,
                           LlmosdError, ModelNotFound, ShuttingDown)
from llmosd.formats.importer import import_model
from llmosd import access
from llmosd.jobs.queue import ACTIVE, FINISHED, TRAINERS, JobState
from llmosd.ops.finetune import (FINETUNE, IMPORT_ADAPTER, FinetuneOps, check_full_model, job_estimate,
                                 off_loop, refusal)
from llmosd.ops.store import check_not_a_base, write_error
from llmosd.server import Ctx
from llmosd.store.store import Store, canonical
from llmosd.store.uploads import Sources
from llmosd.train.create import create
from llmosd.train.spec import check_spec

log = logging.getLogger("llmosd.ops")

# The train job function, named rather than imported: its module imports torch, the daemon's
# loop never does (the worker imports it).
TRAIN = "llmosd.train.pretrain:run"


def invalid_input(check: Callable[[dict], None], spec: dict) -> None:
    """Run a pure spec check; the one place its ValueError becomes InvalidArgument."""
    try:
        check(spec)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def check_train(spec: dict, data: dict, parent: dict | None) -> dict:
    """The train spec checked against its data (``llmosd.train.spec.check_train_spec``);
    returns the spec with its defaults filled in.  ValueError naming the problem."""
    from llmosd.train.spec import check_train_spec
    full = check_train_spec(spec, data, parent)
    # what the devices allow (torch: this runs on the checking thread, never on the loop)
    from llmosd.train.distributed import check_nproc
    from llmosd.train.pretrain import pick_device
    pick_device(full["device"])
    check_nproc(full)
    return full


class JobOps(FinetuneOps):
    """``op_create``, ``op_import`` and ``op_train``: check the request, queue the job,
    publish the result (on the store's writer, off the loop).  ``stopping`` is set at shutdown
    (cancelled jobs then say so).  ``publishing``: models whose manifest is being written."""

    def __init__(self, store: Store, manager, jobs, sources: Sources):
        self.store, self.manager, self.jobs, self.sources = store, manager, jobs, sources
        self.stopping = False
        self.publishing: set[str] = set()

    def op_create(self, ctx: Ctx) -> None:
        spec = dict(ctx.body)
        invalid_input(check_spec, spec)
        self._job(ctx, "create", create, spec)

    def op_import(self, ctx: Ctx) -> None:
        spec = dict(ctx.body)
        files = spec["files"]
        fmt = spec["format"] = spec.get("format") or "hf"
        if fmt not in ("hf", "gguf", "peft"):
            raise InvalidArgument(f"import format {fmt!r} is not supported by this llmosd",
                                  hint="import a Hugging Face directory, a .gguf file or a PEFT adapter")
        if spec.get("dtype") not in (None, *protocol.IMPORT_DTYPES):
            raise InvalidArgument(f"dtype {spec['dtype']!r} is not one of {', '.join(protocol.IMPORT_DTYPES)}")
        if fmt == "gguf" and len(files) != 1:
            raise InvalidArgument(f"a gguf import takes exactly one file, got {len(files)}")
        self._check_names("files", files)
        try:
            refs = self._import_base(spec)
        except LlmosdError:                               # refused: no orphans
            self.store.discard_unreferenced(set(files.values()))
            raise
        same = None if fmt == "peft" else self.sources.same_import(files, fmt, spec.get("dtype") or "auto")
        if same is not None:
            self._reimport(ctx, same, spec)
            return
        try:
            self._check_uploaded("files", files,
                                 "this import differs (other files or dtype) and needs their content")
            if fmt == "peft":
                self._job(ctx, "import", IMPORT_ADAPTER, spec, cleanup=set(files.values()), refs=refs)
            else:
                self._job(ctx, "import", import_model, spec, cleanup=set(files.values()))
        except LlmosdError:                               # refused (name taken, busy...): no orphans
            self.store.discard_unreferenced(set(files.values()))
            raise

    def _import_base(self, spec: dict) -> set[str]:
        """A PEFT adapter is imported onto a base model (``base``, a model with its own
        weights): the worker gets ``_base`` = {name, digest, manifest}; returns the base's
        blobs (kept while the job runs).  Other formats take no base."""
        base = spec.pop("base", None)
        if spec["format"] != "peft":
            if base is not None:
                raise InvalidArgument("a base model is given only for a PEFT adapter import",
                                      hint="import a Hugging Face directory or a .gguf file without --base")
            return set()
        if base is None:
            raise InvalidArgument("a PEFT adapter is imported onto its base model, and none was given",
                                  hint="name the base: llmctl import DIR NAME --base MODEL")
        bcanon, bman, bdigest = self.store.find(base)
        check_full_model(bcanon, bman)
        spec["_base"] = {"name": bcanon, "digest": bdigest, "manifest": bman}
        return self.store.blob_digests(bman)

    def _check_names(self, field: str, files: dict) -> None:
        for rel, digest in files.items():
            if not isinstance(rel, str) or not isinstance(digest, str) or "/" in rel or rel.startswith("."):
                raise InvalidArgument(f"{field}: bad entry {rel!r}")
            self.store.check_digest(digest)               # bad input: invalid_argument

    def _check_uploaded(self, field: str, files: dict, why: str) -> None:
        """InvalidArgument unless every file's blob is stored.  One the client did not send
        because it is a stored model's import source is asked for (the client retries)."""
        missing = {rel: d for rel, d in files.items() if not self.store.has_blob(d)}
        known = {rel: d for rel, d in missing.items() if self.sources.models(d)}
        if known:                                         # we said "have" for them: ask for them
            self.sources.resend.update(known.values())
            rel, digest = next(iter(known.items()))
            raise InvalidArgument(
                f"{field}: {', '.join(known)} were not sent because llmosd knew them as the source "
                f"of {self.sources.models(digest)[0][0]}, but {why}",
                hint="run it again: this time the files are sent")
        for rel, digest in missing.items():
            raise InvalidArgument(f"{field}: {rel} ({digest}) has not been uploaded",
                                  hint="upload each file with 'upload'/'upload_chunk' first")

    def _reimport(self, ctx: Ctx, same: str, spec: dict) -> None:
        """Publish ``same``'s manifest as the new name (a copy, as tag makes), off the loop."""
        canon, force = canonical(spec["name"]), spec.get("force", False)
        if canon != same:
            self._check_target(canon, force, ctx.uid)
        uploads = set(spec["files"].values())             # sent anyway: not needed

        def write():
            if canon != same:
                self.store.copy(same, canon, replace=force)
            self.store.discard_unreferenced(uploads)
            return self.store.get(canon)

        def done(got, error):
            self.publishing.discard(canon)
            if error is not None:
                stream.error(write_error(f"publishing {canon}", error, JobFailed))
                return
            _, man, digest = got
            log.info("import %s by uid %s (the same files as %s: copied, nothing converted)",
                     canon, ctx.uid, same)
            stream.end({"model": canon, "digest": digest, "parameters": man.get("parameters"),
                        "size": self.store.size(man), "job": None, "same_as": same})
        stream = ctx.stream(lambda reason: None)
        self.publishing.add(canon)
        self.store.writer.submit(write, done)

    def _check_target(self, canon: str, force: bool, uid: int | None = None) -> None:
        """Refuse to make ``canon`` when it exists (without force; with force when adapters
        use its weights, or when ``uid`` may not replace it: ``access``), is loaded, or is
        being made."""
        self._check_no_job(canon)         # first: while a job writes it, the name's files move
        try:
            _, old, _ = self.store.get(canon)
            if force:
                access.check(uid, "tag", self._owner(old), self.cfg, thing=f"model {canon}")
            if not force:
                raise AlreadyExists(f"model {canon} already exists",
                                    hint="choose another name, or pass --force to replace it")
            check_not_a_base(self.store, canon)
        except ModelNotFound:
            pass
        self.store.check_free(canon, replace=force)    # a name/namespace clash, refused up front
        if self.manager.table.ids_of(canon):
            raise Busy(f"{canon} is loaded; unload it before replacing it")

    def _check_no_job(self, canon: str) -> None:
        if self.jobs.writing(canon) or canon in self.publishing:
            raise Busy(f"a job is already writing {canon}",
                       hint="wait for it, or cancel it ('llmctl jobs' lists the jobs)")

    # -- train --------------------------------------------------------------------------------
    def op_train(self, ctx: Ctx) -> None:
        """Check the spec against the uploaded data (reading the data off the loop), then queue
        the job and answer with its row.  If the model exists, training continues from it
        (refused while adapters use its weights).  Refused: nothing is queued, and the data
        blobs go unless something else names them.  Otherwise they stay in the store while
        the job's record exists (``job_rm`` releases them)."""
        b = ctx.body
        canon, force = canonical(b["name"]), b.get("force", False)
        data, spec = dict(b["data"]), dict(b["spec"])
        if not data:
            raise InvalidArgument("train needs at least one data file", hint="give --data FILE")
        self._check_names("data", data)
        uploads = set(data.values())
        try:
            self._check_uploaded("data", data, "training needs their content")
            try:
                _, parent_man, parent_digest = self.store.get(canon)
            except ModelNotFound:
                parent_man = parent_digest = None
            self._check_train_target(canon, force, parent_man is not None, ctx.uid)
            self._check_job_quota(ctx)
        except LlmosdError:
            self._discard(uploads)
            raise
        refs = uploads | (self.store.blob_digests(parent_man) if parent_man else set())
        key = object()
        self.jobs.reserve(key, refs)              # nothing may remove them while we check

        parent = None
        if parent_man is not None:    # what the worker needs of it: the manifest's entries
            parent = {"name": canon, "digest": parent_digest,
                      **{k: parent_man[k] for k in ("config", "tokenizer", "weights", "chat_template",
                                                    "defaults") if k in parent_man}}

        def check():                              # on a short thread: reads the data
            texts = {rel: self.store.read_blob(d) for rel, d in data.items()}
            seen = cfg = parent
            if parent is not None:                # the parent's context bounds block_size
                cfg = json.loads(self.store.read_blob(parent["config"]["digest"]))
                seen = {**parent, "context": cfg.get("max_position_embeddings")}
            full = check_train(spec, texts, seen)
            return full, job_estimate(full, cfg)

        def checked(result, error):              # on the loop
            job = None
            try:
                if error is not None:
                    raise refusal(error, "train")
                full, estimate = result
                self._check_train_target(canon, force, parent is not None, ctx.uid)   # again
                device = full.get("device")                                  # may have changed
                if device in (None, "auto"):
                    device = str(self.manager.device)
                wspec = {**full, "device": device, "data": data, "_force": force}
                if parent is not None:
                    wspec["_parent"] = parent
                job = self.jobs.start("train", canon, TRAIN, wspec, ctx.uid,
                                      *self._hooks("train", canon, parent is not None or force),
                                      data=data, refs=refs, priority=b.get("priority", 0), device=device,
                                      preemptible=b.get("preemptible", False), mem_estimate=estimate)
            except Exception as e:     # noqa: BLE001 - a refusal, or the disk (the job's directory)
                ctx.error(write_error(f"queueing the training of {canon}", e))
            finally:
                self.jobs.release(key)
                if job is None:                   # refused: its uploads are not kept
                    self._discard(uploads)
            if job is not None:
                log.info("train %s by uid %s: job %d queued", canon, ctx.uid, job.id)
                ctx.ok({"job": job.row()})
        off_loop(self.jobs.post, "train-check", check, checked)

    def _check_train_target(self, canon: str, force: bool, exists: bool, uid: int | None = None) -> None:
        """A new model: ``_check_target``; an existing one is trained further (new weights),
        which no job may be writing and no adapter may depend on, and only its owner (or an
        administrator: ``access``) may."""
        if not exists:
            self._check_target(canon, force, uid)
            return
        access.check(uid, "tag", self._owner(self.store.get(canon)[1]), self.cfg, thing=f"model {canon}")
        self._check_no_job(canon)
        short = canon.removesuffix(":latest")
        check_not_a_base(self.store, canon, "training it further",
                         hint=f"train a copy instead (llmctl tag {short} NEW, then train NEW)")

    def adopt(self) -> None:
        """At start-up: give the training jobs (train, finetune) loaded from their records what
        they run and how their result is published, then start those that may run.  Other
        kinds were failed by the runner (their client is gone)."""
        for job in self.jobs.jobs.values():
            if job.kind in TRAINERS and job.state not in (JobState.SUCCEEDED, JobState.CANCELLED):
                replace = "_parent" in job.spec or bool(job.spec.get("_force"))
                func = TRAIN if job.kind == "train" else FINETUNE
                self.jobs.attach(job, func, *self._hooks(job.kind, job.model, replace))
        self.jobs.schedule()

    # -- the life of a job ------------------------------------------------------------------------
    def _job(self, ctx: Ctx, kind: str, func: Callable | str, spec: dict, cleanup: set | None = None,
             refs: set | None = None) -> None:
        """Queue job ``func`` that makes model ``spec['name']`` for a streaming client; publish
        its manifest when it returns.  Whatever happens, the stream ends (``end`` or one
        error); the reply comes once the store is written.  ``refs``: blobs of stored models
        the job reads (an adapter's base), kept while it runs."""
        canon, force = canonical(spec.pop("name")), spec.pop("force", False)
        self._check_target(canon, force, ctx.uid)
        self._check_job_quota(ctx)
        job_ref = []
        stream = ctx.stream(lambda reason: self.jobs.cancel(job_ref[0].id))
        progress, finished = self._hooks(kind, canon, force, cleanup or set(), stream)
        extra = {"refs": refs} if refs else {}
        job_ref.append(self.jobs.start(kind, canon, func, spec, ctx.uid, progress, finished, **extra))
        if job_ref[0].state is JobState.QUEUED:
            stream.chunk({"stage": "queued", "message": f"job {job_ref[0].id} is queued: other jobs "
                          "use the device (max_jobs)"})

    def _hooks(self, kind: str, canon: str, replace: bool, cleanup: set = frozenset(),
               stream=None) -> tuple[Callable, Callable]:
        """(on_progress, on_done) of a job making ``canon``: progress goes to ``stream`` (if a
        client waits); a result is published (replacing the model if ``replace``), and the
        blobs the job wrote and the raw uploads in ``cleanup`` go unless a manifest names them.
        Then the job is settled (succeeded or failed) and the stream ends."""
        def progress(job, p):
            job.progress = p
            if stream is not None:
                stream.chunk(p)

        def finished(job, manifest, error):           # on the loop: the worker has ended
            refusal = self._refusal(kind, canon, job, manifest, error)
            owner = getattr(job, "owner", None)
            if isinstance(manifest, dict) and owner is not None:
                manifest = {**manifest, "owner": owner}         # who owns the model (issue 14)
            unneeded = set(cleanup) | set(job.blobs)
            if isinstance(manifest, dict):
                unneeded |= self.store.blob_digests(manifest)
            if refusal is None:
                self.publishing.add(canon)
            self.store.writer.submit(publish, partial(published, job, manifest, refusal),
                                     None if refusal else manifest, unneeded)

        def publish(manifest, unneeded):               # on the store's writer
            try:    # replacing frees the old model's blobs no other manifest (or job) names
                return self.store.write_manifest(canon, manifest, replace=replace) if manifest else None
            finally:
                try:
                    self.store.discard_unreferenced(unneeded)
                except Exception:
                    log.exception("%s of %s: cleaning up its blobs failed", kind, canon)

        def published(job, manifest, refusal, digest, error):   # on the loop again
            self.publishing.discard(canon)
            if refusal is not None or error is not None:
                err = refusal or write_error(f"publishing {canon}", error, JobFailed)
                self._settle(job, err.message)
                if stream is not None:
                    stream.error(err)
                return
            if kind == "import":
                self.sources.resend.difference_update(set(cleanup))
            size = self.store.size(manifest)
            log.info("%s %s by uid %s (%d bytes)", kind, canon, job.uid, size)
            self._settle(job, None)
            if stream is not None:
                stream.end({"model": canon, "digest": digest, "parameters": manifest["parameters"],
                            "size": size, "job": job.id})
        return progress, finished

    def _settle(self, job, reason: str | None) -> None:
        """Tell the job system how publishing ended (only a job still waiting for it)."""
        if job.state in ACTIVE:
            self.jobs.settle(job, reason)

    def _refusal(self, kind: str, canon: str, job, manifest, error: dict | None) -> LlmosdError | None:
        """The error a finished job ends its stream with (cancelled, failed, or no manifest),
        or None when its manifest is to be published."""
        if job.state is JobState.CANCELLED:
            return (ShuttingDown("llmosd is shutting down") if self.stopping
                    else Cancelled(f"{kind} of {canon} was cancelled"))
        if error:
            cls = InvalidArgument if error.get("invalid") else JobFailed
            return cls(f"{kind} of {canon} failed: {error['message']}")
        if job.state in FINISHED and job.state is not JobState.SUCCEEDED:
            return JobFailed(f"{kind} of {canon} failed: {job.reason}")
        if not isinstance(manifest, dict):
            return JobFailed(f"{kind} of {canon} failed: the job returned no manifest")
        return None
