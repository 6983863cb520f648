"""Handlers for serving: load, unload, generate, chat, score, embed, classify, and the
checks of their settings.  Work goes to the instance manager; nothing here runs a model."""
from __future__ import annotations

import logging
import time

from llmctl.errors import InstanceNotFound, InvalidArgument
from llmosd.server import Ctx
from llmosd.serve.chat import TemplateError, check_messages
from llmosd.serve.engine import Call, Request
from llmosd.serve.instances import InstanceManager, Task, check_generate
from llmosd.serve.sampling import SamplingParams
from llmosd.store.store import Store, parse_ref
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
            canon = "%s:%s" % parse_ref(target)
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
            raise InvalidArgument(str(e)) from None
        self._generate(ctx, prompt="", messages=messages)

    def _generate(self, ctx: Ctx, prompt: str, messages: list | None) -> None:
        body = ctx.body
        opts = check_generate(body, self.cfg.default_max_tokens)
        canon, man, digest = self.store.find(body["model"])
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
        canon, man, digest = self.store.find(ctx.body["model"])
        key = (ctx.peer.ident, ctx.rid)
        self._run_on_instance(ctx, canon, man, digest, key, Task(Call(key, name, args), _Reply(ctx)))
