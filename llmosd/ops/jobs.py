"""Handlers for jobs that make models: create and import; publishing their manifests."""
from __future__ import annotations

import logging

from llmctl.errors import (AlreadyExists, Busy, Cancelled, InvalidArgument, JobFailed,
                           LlmosdError, ModelNotFound, ShuttingDown, StoreCorrupt)
from llmosd.jobs.runner import JobRunner, JobState
from llmosd.server import Ctx
from llmosd.store.store import Store, parse_ref
from llmosd.store.uploads import Sources
from llmosd.train.create import check_spec

log = logging.getLogger("llmosd.ops")


class JobOps:
    """``op_create`` and ``op_import``: check the request, run the job in a worker process,
    publish the result.  ``stopping`` is set at shutdown (cancelled jobs then say so)."""

    def __init__(self, store: Store, manager, jobs: JobRunner, sources: Sources):
        self.store, self.manager, self.jobs, self.sources = store, manager, jobs, sources
        self.stopping = False

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
        if self.manager.table.ids_of(canon):
            raise Busy(f"{canon} is loaded; unload it before replacing it")
        if self.jobs.writing(canon):
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
                stream.error(ShuttingDown("llmosd is shutting down") if self.stopping
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
            log.info("%s %s by uid %s (%d bytes)", kind, canon, job.uid, size)
            stream.end({"model": canon, "digest": digest, "parameters": manifest["parameters"],
                        "size": size, "job": job.id})
        job_ref.append(self.jobs.start(kind, canon, func, spec, ctx.uid, progress, done))
