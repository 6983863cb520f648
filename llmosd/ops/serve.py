"""Handlers for serving: load, unload, generate, chat, score, embed, classify, and the
checks of their settings.  They build immutable ``Request``/``Call`` values and hand them, as
``Task``s, to the instance manager (``run``, ``cancel``), which owns the task registry and the
engines; nothing here runs a model or imports torch (the manager arrives through the
constructor).

An adapter or classifier on a base is served by its base's instance: ``_resolve`` finds the
base (``bases.resolve_base``; its errors go to the client as they are) and requests carry the
adapter's key, its manifest digest.  ``load``/``unload`` of an adapter attach it to / detach it
from that instance.

Memory (issue 12): ``load`` takes ``keep_alive`` (seconds; -1 forever, 0 unload when idle),
``priority`` and ``pin``; every request may carry ``keep_alive`` (the latest wins); ``pin`` and
``unpin`` take a model name or an instance id.  What can hold memory from everyone else (pin,
unpin, a priority above 0, keep-alive -1) on an instance another uid loaded is for that uid
(or root, or the daemon's own user): PermissionDenied otherwise.  A load's reply says what it
displaced (``evicted`` rows, ``paused_jobs`` ids).

Access (issue 14, ``llmosd.access``): unload and detach are for the owner of the instance (or
attachment) and administrators; running requests on another uid's instance follows
``shared_inference``; quotas limit a uid's instances, device bytes and open requests."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from llmctl.errors import InstanceNotFound, InvalidArgument, LlmosdError, PermissionDenied
from llmctl.protocol import SAMPLING_KEYS
from llmosd import access
from llmosd.server import Ctx
from llmosd.serve.chat import TemplateError, check_messages
from llmosd.serve.request import Call, Request, SamplingParams, Task, check_head_labels, invalid_argument
from llmosd.store.bases import resolve_base
from llmosd.store.manifest import base_of
from llmosd.store.store import Store, canonical
from llmosd.table import State

if TYPE_CHECKING:
    from llmosd.serve.instances import InstanceManager

log = logging.getLogger("llmosd.ops")

MAX_BATCH_INPUTS = 256


def _int_setting(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    """``body[key]`` as an int in lo..hi; absent or nil means ``default``."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidArgument(f"{key} must be an integer between {lo} and {hi:,}, got {v!r:.40}")
    return v


def check_generate(body: dict, default_max: int) -> dict:
    """Validated generation settings from a request body (InvalidArgument on bad values;
    a setting given as nil counts as not given)."""
    mt = _int_setting(body, "max_tokens", default_max, 1, 1_000_000)
    stops = body.get("stop") or []
    if not isinstance(stops, list) or len(stops) > 16 or \
            not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops):
        raise InvalidArgument("stop must be a list of at most 16 non-empty strings of at most 256 characters")
    logprobs = _int_setting(body, "logprobs", 0, 0, 20)
    return {"max_tokens": mt, "stops": stops, "logprobs": logprobs}


def sampling_params(body: dict, model_defaults: dict | None) -> SamplingParams:
    """The request's settings over the model's own defaults (generation_config, GGUF) over
    ``SamplingParams``' defaults; InvalidArgument when one is out of range."""
    ours = SamplingParams()
    d = {k: getattr(ours, k) for k in SAMPLING_KEYS}
    d.update({k: v for k, v in (model_defaults or {}).items() if k in SAMPLING_KEYS})
    d.update({k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None})
    sp = SamplingParams(temperature=float(d["temperature"]), top_k=int(d["top_k"]),
                        top_p=float(d["top_p"]), min_p=float(d["min_p"]),
                        repetition_penalty=float(d["repetition_penalty"]), seed=body.get("seed"))
    try:
        sp.validate()
    except ValueError as e:
        raise invalid_argument(e) from None
    return sp


class _Reply:
    """A task's answer as one ``ok``/``error`` reply (score, embed, classify), not a stream."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def end(self, body: dict) -> None:
        self.ctx.ok(body)

    def error(self, err) -> None:
        self.ctx.error(err)


def head_max_len(man: dict) -> int | None:
    """The block size a classifier was trained with (its inputs were cut to it), if recorded."""
    args = (man.get("lineage") or {}).get("args") or {}
    n = args.get("block_size") if isinstance(args, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _memory_opts(body: dict) -> dict:
    """A load's memory settings (issue 12) as ``InstanceManager.acquire`` takes them."""
    return {"keep_alive": body.get("keep_alive"), "priority": body.get("priority"),
            "pin": bool(body.get("pin"))}


def load_opts(body: dict) -> dict:
    """A load's weight options (issue 13) as ``InstanceManager.acquire`` takes them: the
    ``dtype`` and ``quant`` given (absent: the daemon's dtype and config ``quant``)."""
    return {k: body[k] for k in ("dtype", "quant") if body.get(k) is not None}


def _holding(opts: dict) -> list[str]:
    """The settings of ``opts`` that hold memory from everyone else (owner only)."""
    out = []
    if opts.get("pin"):
        out.append("pin")
    if (opts.get("priority") or 0) > 0:
        out.append(f"priority {opts['priority']}")
    ka = opts.get("keep_alive")
    if ka is not None and ka < 0:
        out.append("keep-alive -1 (forever)")
    return out


def check_owner(ctx: Ctx, inst, what: str, cfg=None, action: str = "hold") -> None:
    """PermissionDenied unless ``ctx``'s uid may ``what`` (pin, unload...) instance ``inst``:
    the uid that loaded it, or an administrator (``access.may``: root, the daemon's own user,
    the config's admin_group)."""
    if inst is None or inst.uid is None:
        return
    err = access.may(ctx.uid, action, inst.uid, cfg, thing=f"instance {inst.id} ({inst.model})")
    if err is None:
        return
    if action == "hold":
        raise PermissionDenied(f"instance {inst.id} ({inst.model}) was loaded by "
                               f"{access.user_name(inst.uid)}: only its owner or an administrator "
                               f"may {what} it", hint="ask its owner, or load your own copy without --pin, "
                                                      "a priority above 0 or --keep-alive -1")
    raise err


def displaced_fields(rows: list[dict]) -> dict:
    """A load's ``evicted`` (model, instance, to, reason) and ``paused_jobs`` from
    ``Placement.make_room``'s rows."""
    return {"evicted": [{k: r.get(k) for k in ("model", "instance", "to", "reason")}
                        for r in rows if "instance" in r],
            "paused_jobs": [r["job"] for r in rows if "job" in r]}


class ServeOps:
    def __init__(self, cfg, store: Store, manager: InstanceManager):
        self.cfg, self.store, self.manager = cfg, store, manager
        if cfg is not None and hasattr(manager, "use_config"):
            manager.use_config(cfg)    # engine settings (issue 13) read at each load: reloads apply

    def _resolve(self, name: str) -> tuple[str, dict, str, tuple | None]:
        """(name:tag, manifest, digest, base) of a model; ``base`` = (name, manifest, digest)
        of the base an adapter or classifier runs on, None for a model with its own weights."""
        canon, man, digest = self.store.find(name)
        if base_of(man) is None:
            return canon, man, digest, None
        return canon, man, digest, resolve_base(self.store, canon, man)

    def op_load(self, ctx: Ctx) -> None:
        canon, man, digest, base = self._resolve(ctx.body["model"])
        if base is not None:
            self._load_adapter(ctx, canon, man, digest, base)
            return
        t0 = time.perf_counter()
        existing = self.manager.table.usable(canon, digest)
        already = existing is not None and existing.serving
        opts, shown = _memory_opts(ctx.body), []
        for what in _holding(opts):
            check_owner(ctx, existing, f"set {what} on", self.cfg)
        weights = load_opts(ctx.body)
        if existing is None:
            self._check_load_quota(ctx, man, weights)
        else:                          # loaded with other weight options: said before anything
            self.manager.check_opts(existing, weights)

        def ready(inst, err):
            if err:
                ctx.error(err)
                return
            if not already:
                log.info("load %s by uid %s (instance %d)", canon, ctx.uid, inst.id)
            ctx.ok({**inst.row(), "load_ms": round((time.perf_counter() - t0) * 1000, 3),
                    "already_loaded": already, **displaced_fields(shown)})
        self.manager.acquire(canon, man, digest, ctx.uid, ready, **opts, displaced=shown, load_opts=weights)

    def _load_adapter(self, ctx: Ctx, canon: str, man: dict, digest: str, base: tuple) -> None:
        """Attach an adapter to its base's instance (loading the base if needed): the reply is
        the base instance's row with the adapter's row as ``adapter``."""
        t0 = time.perf_counter()
        existing = self.manager.table.usable(base[0], base[2])
        a = existing.adapters.get(digest) if existing is not None else None
        already = existing is not None and existing.serving and a is not None and a.ready
        opts, shown = _memory_opts(ctx.body), []
        for what in _holding(opts):
            check_owner(ctx, existing, f"set {what} on", self.cfg)

        def ready(inst, err):
            if err:
                ctx.error(err)
                return
            if not already:
                log.info("load %s on %s by uid %s (instance %d)", canon, inst.model, ctx.uid, inst.id)
            got = inst.adapters.get(digest)     # named as asked (a second tag shares the row)
            ctx.ok({**inst.row(), "adapter": {**got.row(), "model": canon} if got is not None else None,
                    "load_ms": round((time.perf_counter() - t0) * 1000, 3), "already_loaded": already,
                    **displaced_fields(shown)})
        self.manager.acquire_adapter(base, canon, man, digest, ctx.uid, ready, **opts, displaced=shown)

    def op_unload(self, ctx: Ctx) -> None:
        target, force = ctx.body["target"], ctx.body.get("force", False)
        if target.isascii() and target.isdigit():
            if len(target) > 18:
                raise InstanceNotFound(f"no instance with id {target[:20]}...")
            insts = [self.manager.table.get(int(target))]
        else:
            canon = canonical(target)
            insts = [i for i in self.manager.table if i.model == canon]
            digest = self._adapter_digest(canon) if not insts else None
            hosts = self.manager.table.with_adapter(canon, digest)
            if not insts and hosts:   # an adapter: detach it from the instances it is on
                self._detach(ctx, canon, [(i, i.attached(canon, digest)) for i in hosts], force)
                return
            if not insts:             # like 'systemctl stop' of a stopped unit: nothing to do
                self.store.find(canon)      # ...but a model that does not exist is an error
                ctx.ok({"unloaded": []})
                return
        for inst in insts:            # owners first (issue 14): a refusal unloads nothing
            check_owner(ctx, inst, "unload", self.cfg, action="unload")
        if not force:                 # check all first so a refusal unloads nothing
            for inst in insts:
                if inst.state is not State.FAILED:
                    self.manager.check_unloadable(inst)
        ids = [i.id for i in insts]
        pending = set(ids)
        # the adapters attached to them go with them: named in the reply (before they are gone)
        adapters = sorted({a.model for i in insts for a in (getattr(i, "adapters", None) or {}).values()})

        def done(iid):
            pending.discard(iid)
            if not pending:
                log.info("unload %s by uid %s (instance %s)", ", ".join(sorted({i.model for i in insts})),
                         ctx.uid, ", ".join(map(str, ids)))
                ctx.ok({"unloaded": ids, **({"adapters": adapters} if adapters else {})})
        for inst in insts:
            self.manager.unload(inst, force, lambda iid=inst.id: done(iid))

    # -- pins -------------------------------------------------------------------------------
    def op_pin(self, ctx: Ctx) -> None:
        self._pin(ctx, True)

    def op_unpin(self, ctx: Ctx) -> None:
        self._pin(ctx, False)

    def _pin(self, ctx: Ctx, pinned: bool) -> None:
        """Pin (never evicted, never expires) or unpin the instances ``target`` names: an
        instance id, or a model (or an adapter: the instances it is attached to)."""
        insts = self._targets(ctx.body["target"], "pin" if pinned else "unpin")
        for inst in insts:                      # all checked first: a refusal changes nothing
            check_owner(ctx, inst, "pin" if pinned else "unpin", self.cfg)
        for inst in insts:
            inst.pinned = pinned
        ids = [i.id for i in insts]
        log.info("%s instance %s by uid %s", "pin" if pinned else "unpin", ", ".join(map(str, ids)), ctx.uid)
        ctx.ok({"pinned" if pinned else "unpinned": ids, "instances": [i.row() for i in insts]})

    def _targets(self, target: str, verb: str) -> list:
        """The live instances ``target`` (an id or a model name) names; InstanceNotFound when
        none (ModelNotFound for a model the store does not have)."""
        table = self.manager.table
        if target.isascii() and target.isdigit():
            if len(target) > 18:
                raise InstanceNotFound(f"no instance with id {target[:20]}...")
            insts = [table.get(int(target))]
        else:
            canon = canonical(target)
            insts = [table.get(i) for i in table.ids_of(canon)]
            if not insts:
                self.store.find(canon)          # a model that does not exist: its own error
                raise InstanceNotFound(f"{canon} is not loaded", hint=f"load it first (llmctl load "
                                       f"{target}{' --pin' if verb == 'pin' else ''})")
        insts = [i for i in insts if i.state not in (State.FAILED, State.UNLOADING)]
        if not insts:
            raise InstanceNotFound(f"{target} has no loaded instance to {verb}")
        return insts

    def _adapter_digest(self, canon: str) -> str | None:
        """The manifest digest of adapter ``canon``, the key it is attached by whatever tag
        attached it; None if the store has no such adapter (then it is matched by name)."""
        try:
            _, man, digest = self.store.get(canon)
        except LlmosdError:
            return None
        return digest if base_of(man) is not None else None

    def _detach(self, ctx: Ctx, canon: str, attached: list, force: bool) -> None:
        """Detach each (instance, attached adapter) of ``attached``."""
        for inst, a in attached:      # check all first so a refusal detaches nothing
            if a.uid is not None:     # the uid that attached it; else the instance's owner
                access.check(ctx.uid, "detach", a.uid, self.cfg, thing=f"{canon} on instance {inst.id}")
            else:
                check_owner(ctx, inst, "detach", self.cfg, action="detach")
            self.manager.check_resident(inst, a)
            if not force:
                self.manager.check_detachable(inst, a)
        for inst, a in attached:
            self.manager.detach(inst, a.digest, force)
        ids = [inst.id for inst, _ in attached]
        log.info("unload %s by uid %s (detached from instance %s)", canon, ctx.uid, ", ".join(map(str, ids)))
        ctx.ok({"unloaded": [], "detached": ids, "model": canon})

    # -- generation -----------------------------------------------------------------------
    def op_generate(self, ctx: Ctx) -> None:
        self._generate(ctx, prompt=ctx.body["prompt"], messages=None)

    def op_chat(self, ctx: Ctx) -> None:
        try:
            messages = check_messages(ctx.body["messages"])
        except TemplateError as e:
            raise invalid_argument(e) from None
        self._generate(ctx, prompt="", messages=messages)

    def _generate(self, ctx: Ctx, prompt: str, messages: list | None) -> None:
        body = ctx.body
        opts = check_generate(body, self.cfg.default_max_tokens)
        canon, man, digest, base = self._resolve(body["model"])
        sp = sampling_params(body, man.get("defaults"))
        key = (ctx.peer.ident, ctx.rid)
        req = Request(key, prompt, opts["max_tokens"], sp, opts["stops"],
                      add_bos=body.get("add_bos", True), messages=messages, logprobs=opts["logprobs"],
                      adapter=digest if base else None)
        self._run(ctx, canon, man, digest, Task(req, ctx.stream(lambda reason: self.manager.cancel(key, reason))),
                  base)

    def _run(self, ctx: Ctx, canon: str, man: dict, digest: str, task: Task,
             base: tuple | None = None) -> None:
        """Hand ``task`` to the instance manager (on ``base``'s instance for an adapter).  A
        stream that must wait for a load first gets one empty chunk saying so (``loading``: the
        model; ``wait``: "load", or "swap_in" for one swapped out to host memory).  A request's
        ``keep_alive`` -1 on another uid's instance: PermissionDenied (``check_owner``)."""
        name, _, ver = base or (canon, man, digest)
        on = self.manager.table.usable(name, ver)        # the instance it will run on, if any
        err = self._may_run(ctx, on)
        if err is None and on is None:      # it will load one: the uid's load quotas apply too
            try:
                self._check_load_quota(ctx, base[1] if base else man)
            except PermissionDenied as e:
                err = e
        if err is not None:                 # the stream (or reply) ends with the refusal
            task.stream.error(err)
            return
        ka = ctx.body.get("keep_alive")
        if ka is not None and ka < 0:
            try:                                # the stream is open: it ends with the refusal
                check_owner(ctx, on, "keep forever (keep-alive -1)", self.cfg)
            except PermissionDenied as e:
                task.stream.error(e)
                return
        swap = on is not None and on.state is State.SWAPPED    # the wait will be its swap-in

        def loading():
            if isinstance(task.req, Request):
                first = {"text": "", "token_ids": [], "loading": canon, "wait": "swap_in" if swap else "load"}
                if task.req.logprobs:
                    first["logprobs"] = []
                task.stream.chunk(first)
        self.manager.run(canon, man, digest, ctx.uid, task, loading, base=base,
                         keep_alive=ctx.body.get("keep_alive"))

    def _may_run(self, ctx: Ctx, on) -> PermissionDenied | None:
        """The refusal of a request of ``ctx`` on instance ``on`` (None: one will be loaded
        for it): another uid's instance while ``shared_inference`` is off; more open
        requests than the uid's ``max_queued_requests``."""
        if on is not None and on.uid is not None:
            err = access.may(ctx.uid, "infer", on.uid, self.cfg, thing=f"instance {on.id} ({on.model})")
            if err is not None:
                return err
        if access.quota(ctx.uid, "max_queued_requests", self.cfg) is None:
            return None
        peers = getattr(ctx.server, "peers", {}) or {}
        used = sum(len(p.open_ids) for p in peers.values() if p.uid == ctx.uid)
        return access.over_quota(ctx.uid, "max_queued_requests", max(0, used - 1), 1, self.cfg)

    def _check_load_quota(self, ctx: Ctx, man: dict, load_opts: dict | None = None) -> None:
        """``max_instances`` and ``max_device_bytes`` of ``ctx``'s uid before a load makes a
        new instance.  Device bytes are the memory manager's: what the uid's instances are
        charged on the device (weights, adapters, KV pools) plus the new load's estimate."""
        if ctx.uid is None:
            return
        mine = [i for i in self.manager.table if i.uid == ctx.uid and i.state is not State.FAILED]
        err = access.over_quota(ctx.uid, "max_instances", len(mine), 1, self.cfg)
        if err is None and access.quota(ctx.uid, "max_device_bytes", self.cfg) is not None:
            used = sum(i.charge_bytes("device") for i in mine if i.tier == "device")
            err = access.over_quota(ctx.uid, "max_device_bytes", used,
                                    self.manager.load_bytes(man, load_opts), self.cfg)
        if err is not None:
            raise err

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
        """Zero-shot with ``labels``; a classifier (a model with a head) uses its head and its
        trained labels (``labels`` optional, and then the same ones).  An empty list counts as
        no labels (clients before protocol 1.6 always sent the field)."""
        b = ctx.body
        if not all(isinstance(x, str) for x in b["inputs"]) or len(b["inputs"]) > MAX_BATCH_INPUTS:
            raise InvalidArgument(f"inputs must be a list of at most {MAX_BATCH_INPUTS} strings")
        labels = b.get("labels") or None
        if labels is not None and (not isinstance(labels, list) or len(labels) > 64 or
                                   not all(isinstance(x, str) and x.strip() for x in labels)):
            raise InvalidArgument("labels must be a list of at most 64 non-empty strings")
        resolved = self._resolve(b["model"])
        head = resolved[1].get("head")
        if head:
            if b.get("template") is not None:
                raise InvalidArgument(f"{resolved[0]} is a classifier: it classifies with its trained "
                                      "head, and a prompt template is for zero-shot classification",
                                      hint="leave out --template")
            try:
                check_head_labels(list(head.get("labels") or []), labels)
            except ValueError as e:
                raise invalid_argument(e, hint="leave out --labels to use the trained ones") from None
            self._evaluate(ctx, "classify_head", {"inputs": b["inputs"], "labels": labels,
                                                  "max_len": head_max_len(resolved[1])}, resolved)
            return
        if labels is None:
            raise InvalidArgument("this model has no classification head: give --labels",
                                  hint="zero-shot classification needs the candidate labels, "
                                       "e.g. --labels positive,negative")
        self._evaluate(ctx, "classify", {"inputs": b["inputs"], "labels": labels,
                                         "template": b.get("template")}, resolved)

    def _evaluate(self, ctx: Ctx, name: str, args: dict, resolved: tuple | None = None) -> None:
        canon, man, digest, base = resolved or self._resolve(ctx.body["model"])
        call = Call((ctx.peer.ident, ctx.rid), name, args, adapter=digest if base else None)
        self._run(ctx, canon, man, digest, Task(call, _Reply(ctx)), base)
