"""Handlers for jobs that make models: create and import; publishing their manifests."""
from __future__ import annotations

import logging
from functools import partial
from typing import Callable

from llmctl import protocol
from llmctl.errors import (AlreadyExists, Busy, Cancelled, InvalidArgument, JobFailed,
                           LlmosdError, ModelNotFound, ShuttingDown)
from llmosd.formats.importer import import_model
from llmosd.jobs.queue import JobState
from llmosd.ops.store import write_error
from llmosd.server import Ctx
from llmosd.store.store import Store, canonical
from llmosd.store.uploads import Sources
from llmosd.train.create import create
from llmosd.train.spec import check_spec

log = logging.getLogger("llmosd.ops")


def invalid_input(check: Callable[[dict], None], spec: dict) -> None:
    """Run a pure spec check; the one place its ValueError becomes InvalidArgument."""
    try:
        check(spec)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


class JobOps:
    """``op_create`` and ``op_import``: check the request, run the job in a worker process,
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
        if fmt not in ("hf", "gguf"):
            raise InvalidArgument(f"import format {fmt!r} is not supported by this llmosd",
                                  hint="import a Hugging Face directory or a .gguf file")
        if spec.get("dtype") not in (None, *protocol.DTYPES):
            raise InvalidArgument(f"dtype {spec['dtype']!r} is not one of {', '.join(protocol.DTYPES)}")
        if fmt == "gguf" and len(files) != 1:
            raise InvalidArgument(f"a gguf import takes exactly one file, got {len(files)}")
        for rel, digest in files.items():
            if not isinstance(rel, str) or not isinstance(digest, str) or "/" in rel or rel.startswith("."):
                raise InvalidArgument(f"files: bad entry {rel!r}")
            self.store.blob_path(digest)                  # a well-formed digest, or StoreCorrupt
        same = self.sources.same_import(files, fmt, spec.get("dtype") or "auto")
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
            self._job(ctx, "import", import_model, spec, cleanup=set(files.values()))
        except LlmosdError:                               # refused (name taken, busy...): no orphans
            self.store.discard_unreferenced(set(files.values()))
            raise

    def _reimport(self, ctx: Ctx, same: str, spec: dict) -> None:
        """Publish ``same``'s manifest as the new name (a copy, as tag makes), off the loop."""
        canon, force = canonical(spec["name"]), spec.get("force", False)
        if canon != same:
            self._check_target(canon, force)
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
        if self.manager.table.ids_of(canon):
            raise Busy(f"{canon} is loaded; unload it before replacing it")
        if self.jobs.writing(canon) or canon in self.publishing:
            raise Busy(f"a job is already writing {canon}")

    def _job(self, ctx: Ctx, kind: str, func: Callable, spec: dict, cleanup: set | None = None) -> None:
        """Run job ``func`` that makes model ``spec['name']``; publish its manifest when it returns.

        Whatever happens, the stream ends (``end`` or one error), and the blobs the job wrote and
        the raw uploads in ``cleanup`` go unless a manifest names them; the reply comes once the
        store is written (on the store's writer, off the loop).
        """
        canon, force = canonical(spec.pop("name")), spec.pop("force", False)
        self._check_target(canon, force)
        job_ref = []
        stream = ctx.stream(lambda reason: self.jobs.cancel(job_ref[0].id))

        def progress(job, p):
            job.progress = p
            stream.chunk(p)

        def finished(job, manifest, error):           # on the loop: the worker has ended
            refusal = self._refusal(kind, canon, job, manifest, error)
            unneeded = set(cleanup or ()) | set(job.blobs)
            if isinstance(manifest, dict):
                unneeded |= self.store.blob_digests(manifest)
            if refusal is None:
                self.publishing.add(canon)
            self.store.writer.submit(publish, partial(published, job, manifest, refusal),
                                     None if refusal else manifest, unneeded)

        def publish(manifest, unneeded):               # on the store's writer
            try:    # replacing (force) frees the old model's blobs no other manifest names
                return self.store.write_manifest(canon, manifest, replace=force) if manifest else None
            finally:
                try:
                    self.store.discard_unreferenced(unneeded)
                except Exception:
                    log.exception("%s of %s: cleaning up its blobs failed", kind, canon)

        def published(job, manifest, refusal, digest, error):   # on the loop again
            self.publishing.discard(canon)
            if refusal is not None or error is not None:
                stream.error(refusal or write_error(f"publishing {canon}", error, JobFailed))
                return
            self.sources.resend.difference_update(set(cleanup or ()))
            size = self.store.size(manifest)
            log.info("%s %s by uid %s (%d bytes)", kind, canon, job.uid, size)
            stream.end({"model": canon, "digest": digest, "parameters": manifest["parameters"],
                        "size": size, "job": job.id})
        job_ref.append(self.jobs.start(kind, canon, func, spec, ctx.uid, progress, finished))

    def _refusal(self, kind: str, canon: str, job, manifest, error: dict | None) -> LlmosdError | None:
        """The error a finished job ends its stream with (cancelled, failed, or no manifest),
        or None when its manifest is to be published."""
        if job.state is JobState.CANCELLED:
            return (ShuttingDown("llmosd is shutting down") if self.stopping
                    else Cancelled(f"{kind} of {canon} was cancelled"))
        if error:
            cls = InvalidArgument if error["invalid"] else JobFailed
            return cls(f"{kind} of {canon} failed: {error['message']}")
        if not isinstance(manifest, dict):
            return JobFailed(f"{kind} of {canon} failed: the job returned no manifest")
        return None
