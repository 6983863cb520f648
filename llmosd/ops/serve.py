"""Handlers for serving: load, unload, generate, chat, score, embed, classify, and the
checks of their settings.  They build immutable ``Request``/``Call`` values and hand them, as
``Task``s, to the instance manager (``run``, ``cancel``), which owns the task registry and the
engines; nothing here runs a model or imports torch (the manager arrives through the
constructor)."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from llmctl.errors import InstanceNotFound, InvalidArgument
from llmctl.protocol import SAMPLING_KEYS
from llmosd.server import Ctx
from llmosd.serve.chat import TemplateError, check_messages
from llmosd.serve.request import Call, Request, SamplingParams, Task, invalid_argument
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


class ServeOps:
    def __init__(self, cfg, store: Store, manager: InstanceManager):
        self.cfg, self.store, self.manager = cfg, store, manager

    def op_load(self, ctx: Ctx) -> None:
        canon, man, digest = self.store.find(ctx.body["model"])
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
            canon = canonical(target)
            insts = [i for i in self.manager.table if i.model == canon]
            if not insts:             # like 'systemctl stop' of a stopped unit: nothing to do
                self.store.find(canon)      # ...but a model that does not exist is an error
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
        canon, man, digest = self.store.find(body["model"])
        sp = sampling_params(body, man.get("defaults"))
        key = (ctx.peer.ident, ctx.rid)
        req = Request(key, prompt, opts["max_tokens"], sp, opts["stops"],
                      add_bos=body.get("add_bos", True), messages=messages, logprobs=opts["logprobs"])
        self._run(ctx, canon, man, digest, Task(req, ctx.stream(lambda reason: self.manager.cancel(key, reason))))

    def _run(self, ctx: Ctx, canon: str, man: dict, digest: str, task: Task) -> None:
        """Hand ``task`` to the instance manager.  A stream that must wait for a load first
        gets one empty chunk saying so (``loading``)."""
        def loading():
            if isinstance(task.req, Request):
                first = {"text": "", "token_ids": [], "loading": canon}
                if task.req.logprobs:
                    first["logprobs"] = []
                task.stream.chunk(first)
        self.manager.run(canon, man, digest, ctx.uid, task, loading)

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
        canon, man, digest = self.store.find(ctx.body["model"])
        self._run(ctx, canon, man, digest, Task(Call((ctx.peer.ident, ctx.rid), name, args), _Reply(ctx)))
