"""Handlers for the store: ls, show, rm, tag, and blob uploads and downloads.

Access (issue 14): ``rm`` and ``tag --force`` (replacing a model) are for the model's owner
(its manifest's ``owner``; a model published before owners were recorded is anyone's) and
administrators; ``ls`` shows each model's owner."""
from __future__ import annotations

import json
import logging

from llmctl import protocol
from llmctl.errors import (AlreadyExists, Busy, Internal, InvalidArgument, LlmosdError, ModelNotFound,
                           StoreCorrupt)
from llmosd import access
from llmosd.jobs.queue import keeps_refs
from llmosd.ops.export import held_weights, release
from llmosd.server import Ctx
from llmosd.store.bases import dependents
from llmosd.store.manifest import base_of, kind_of
from llmosd.store.store import Store, canonical
from llmosd.store.uploads import Sources, Uploads

log = logging.getLogger("llmosd.ops")


def weights_form(man: dict) -> str | None:
    """How a stored model's weights are held: its quantization (e.g. "q4_1+q8_0", "int8"),
    else its float dtype; None for a model without weights of its own (an adapter)."""
    w = man.get("weights")
    if not isinstance(w, dict):
        return None
    return w.get("quant") or w.get("dtype")


class StoreOps:
    """``op_<type>`` for the store's message types.  ``manager`` and ``jobs`` are asked only
    whether a model is loaded or being written.  ``cfg`` (the daemon's config: admin_group)
    is set by whoever builds this; None means no admin group."""

    cfg = None

    def _owner(self, man: dict) -> int | None:
        """``man``'s owner for access checks (``access.model_owner``); a model published
        before owners were recorded has none, and anyone may act on it."""
        return access.model_owner(man, legacy=False)

    def __init__(self, store: Store, manager, jobs, uploads: Uploads, sources: Sources):
        self.store, self.manager, self.jobs = store, manager, jobs
        self.uploads, self.sources = uploads, sources

    def peer_gone(self, peer) -> None:
        """A client left: its open uploads go, with their temp files."""
        n = self.uploads.release(peer.ident)
        if n:
            log.info("%r went away; dropped its %d open upload(s)", peer, n)

    def op_ls(self, ctx: Ctx) -> None:
        models = []
        for ref, digest, man in self.store.list():
            lin = man.get("lineage") or {}
            models.append({"model": ref, "digest": digest, "size": self.store.size(man),
                           "parameters": man.get("parameters"), "created": man.get("created"),
                           "modified": man.get("_mtime"), "architecture": man.get("architecture"),
                           "method": lin.get("method"), "parent": lin.get("parent"),
                           "kind": kind_of(man), "base": (base_of(man) or {}).get("model"),
                           "instances": self.manager.table.ids_of(ref),
                           "weights": weights_form(man),
                           "owner": self._owner(man), "owner_name": _name(self._owner(man))})
        ctx.ok({"models": models})

    def op_show(self, ctx: Ctx) -> None:
        """A model's manifest, config and size, and the rows of the instances that serve it:
        its own, or, for an adapter or classifier, those of its base it is attached to."""
        canon, man, digest = self.store.find(ctx.body["model"])
        ids = set(self.manager.table.ids_of(canon))
        config = json.loads(self.store.read_blob(man["config"]["digest"]))
        ctx.ok({"model": canon, "digest": digest, "manifest": man, "config": config,
                "size": self.store.size(man),
                "instances": [i.row() for i in self.manager.table if i.id in ids]})

    def op_rm(self, ctx: Ctx) -> None:
        """Remove a model that is neither loaded nor being written nor read by a job.  A base
        that adapters or classifiers use is refused unless ``force``, which removes them too
        (listed in the reply's ``removed``, present only then).  They are gone for every other request at once;
        the reply comes when the store's writer has removed them."""
        canon, _, _ = self.store.find(ctx.body["model"])
        deps = dependents(self.store, canon)
        if deps and not ctx.body.get("force", False):     # lasting: not busy, retrying won't help
            short = canon.removesuffix(":latest")
            raise InvalidArgument(f"{canon} is the base of {len(deps)} model(s) that use its weights: "
                       f"{', '.join(deps)}",
                       hint=f"remove them first, or remove them with it: llmctl rm --force {short}")
        for model in (canon, *deps):  # owners first: a refusal removes nothing
            access.check(ctx.uid, "rm", self._owner(self.store.get(model)[1]), self.cfg,
                         thing=f"model {model}")
        for model in (canon, *deps):
            self._check_removable(model)
        gone = [*deps, canon]
        blobs = blob_sizes(*(self.store.get(m)[1] for m in gone))

        def remove():                 # on the store's writer: the dependents first
            removed, freed = [], 0
            for d in deps:
                freed += self.store.remove(d).get("freed_bytes", 0)
                removed.append(d)
            r = self.store.remove(canon)
            r["freed_bytes"] = r.get("freed_bytes", 0) + freed
            return {**r, "removed": removed} if removed else r

        def done(r, error):
            for model in gone:
                self.store.leaving(model, gone=False)
            if error is not None:
                ctx.error(write_error(f"removing {canon}", error))
                return
            r.update(self._kept_by_jobs(blobs))
            log.info("rm %s by uid %s (freed %d bytes)%s", canon, ctx.uid, r.get("freed_bytes", 0),
                     f"; with it {', '.join(r['removed'])}" if r.get("removed") else "")
            ctx.ok(r)
        for model in gone:
            self.store.leaving(model)
        self.store.writer.submit(remove, done)

    def _kept_by_jobs(self, blobs: dict[str, int]) -> dict:
        """Of a removed model's ``blobs`` ({digest: size}), those the store kept only because
        job records name them (a finished training's data and parent, resumable until
        ``jobs rm``): {"kept_by_jobs": [job ids], "kept_bytes": n}, or {} when none."""
        jobs = getattr(self.jobs, "jobs", None) or {}
        kept = {d for d in blobs if not self.store.referenced(d)}
        ids, held = [], set()
        for jid, job in sorted(jobs.items()):
            mine = kept & set(getattr(job, "refs", ()) or ())
            if mine and keeps_refs(job):
                ids.append(jid)
                held |= mine
        return {"kept_by_jobs": ids, "kept_bytes": sum(blobs[d] for d in held)} if ids else {}

    def _check_removable(self, canon: str) -> None:
        """Busy when ``canon`` is loaded (as a model, or as an adapter on its base's
        instance), or a job makes or reads it."""
        ids = self.manager.table.ids_of(canon)
        if ids:
            raise Busy(f"{canon} is loaded (instance {', '.join(map(str, ids))})",
                       hint=f"unload it first: llmctl unload {canon}")
        hosts = adapter_hosts(self.manager.table, canon)
        if hosts:
            raise Busy(f"{canon} is loaded on instance {', '.join(map(str, hosts))} of its base",
                       hint=f"unload it first: llmctl unload {canon}")
        if self.jobs.writing(canon):
            raise Busy(f"{canon} is the target of a job that is queued or running",
                       hint="wait for it to finish, or cancel it (llmctl jobs; llmctl cancel JOB)")
        readers = getattr(self.jobs, "readers", lambda m: [])(canon)
        if readers:
            raise Busy(f"{canon} is used by job {', '.join(map(str, readers))} (queued, running, "
                       "paused, or failed and resumable)",
                       hint="wait for it to finish, or cancel it (llmctl jobs; llmctl cancel JOB); "
                            "a failed one: llmctl jobs rm JOB")

    def op_tag(self, ctx: Ctx) -> None:
        """Give a model another name; the reply comes when the store's writer has written it."""
        src, _, digest = self.store.find(ctx.body["source"])
        dst = canonical(ctx.body["target"])
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
            access.check(ctx.uid, "tag", self._owner(old), self.cfg, thing=f"model {dst}")
            if self.manager.table.ids_of(dst):
                raise Busy(f"{dst} is loaded; unload it before replacing it")
            check_not_a_base(self.store, dst, hint="choose another target name")

        def done(canon, error):
            if error is not None:
                ctx.error(write_error(f"tagging {src} as {dst}", error))
                return
            log.info("tag %s as %s by uid %s%s", src, canon, ctx.uid, " (replaced)" if old else "")
            ctx.ok({"model": canon, "source": src, "digest": digest})
        # frees a replaced model's blobs no other model uses
        # the new name is the tagger's (bob's tag of alice's model is bob's to remove)
        self.store.writer.submit(lambda: self.store.copy(src, dst, replace=force, owner=ctx.uid), done)

    # -- uploads --------------------------------------------------------------------------
    def op_upload(self, ctx: Ctx) -> None:
        """Open an upload slot owned by the client, or answer ``have`` when nothing need be
        sent: the store has the blob, or a stored model was imported from that file."""
        digest, peer = ctx.body["digest"], ctx.peer
        self.store.check_digest(digest)                   # bad input: invalid_argument
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
        """A piece of a blob a manifest refers to (export reads models this way), or of the
        float32 weights an export of a quantized model made for this client (``ops.export``:
        removed once read to the end)."""
        b = ctx.body
        if b["offset"] < 0 or not 0 < b["size"] <= protocol.UPLOAD_CHUNK:
            raise InvalidArgument(f"download: offset must be >= 0 and size in 1..{protocol.UPLOAD_CHUNK}")
        fw = held_weights(ctx.peer, b["digest"])
        if fw is not None:
            data = fw.read(b["offset"], b["size"])
            if b["offset"] + len(data) >= fw.size:
                release(ctx.peer, fw)
            ctx.ok({"data": data, "total": fw.size})
            return
        if not self.store.referenced(b["digest"]):
            raise ModelNotFound(f"no model in the store refers to blob {b['digest']}")
        data, total = self.store.read_range(b["digest"], b["offset"], b["size"])
        ctx.ok({"data": data, "total": total})



def _name(uid: int | None) -> str | None:
    """The user name of ``uid`` (``ls``'s OWNER), its number when passwd has none."""
    import pwd
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def blob_sizes(*manifests: dict) -> dict[str, int]:
    """{digest: size} of the blobs the manifests name (their entries' sizes; 0 when unsaid)."""
    out = {}
    for man in manifests:
        for v in man.values():
            if isinstance(v, dict) and isinstance(v.get("digest"), str):
                out[v["digest"]] = int(v.get("size") or 0)
    return out


def adapter_hosts(table, canon: str) -> list[int]:
    """Ids of the instances that have adapter ``canon`` attached: ``Instance.adapters`` keyed
    by the adapter's name, or holding entries whose ``model`` is it (a table without adapters
    has none)."""
    def names(adapters) -> set:
        items = adapters.values() if isinstance(adapters, dict) else adapters
        out = set(adapters) if isinstance(adapters, dict) else set()
        return out | {a.get("model") if isinstance(a, dict) else getattr(a, "model", None) for a in items}
    return [i.id for i in table if canon in names(getattr(i, "adapters", None) or {})]


def check_not_a_base(store, canon: str, doing: str = "replacing it",
                     hint: str = "choose another name") -> None:
    """InvalidArgument (a lasting state, not a busy one: exit 65, not "try again") when
    adapters or classifiers use ``canon``'s weights (``bases.dependents``):
    ``doing`` (replacing it, training it further) would give it other weights, and they would
    then fail to load ("other weights").  The hint names the other way and ``rm --force``."""
    deps = dependents(store, canon)
    if deps:
        short = canon.removesuffix(":latest")
        raise InvalidArgument(f"{canon} is the base of {len(deps)} model(s) that use its weights: "
                              f"{', '.join(deps)}; {doing} would break them",
                              hint=f"{hint}, or remove {canon} with them first: llmctl rm --force {short}")


def write_error(what: str, e: Exception, other: type[LlmosdError] = Internal) -> LlmosdError:
    """What a client is told when a store write (run on the store's writer) failed: a refusal
    as it is; a disk error as StoreCorrupt naming the cause; anything else as ``other``."""
    if isinstance(e, LlmosdError):
        return e
    cls = StoreCorrupt if isinstance(e, OSError) else other
    return cls(f"{what} failed: {getattr(e, 'strerror', None) or e}",
               hint="check the free space and permissions of the state directory, then try again")
