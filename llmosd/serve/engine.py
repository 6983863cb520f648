"""The engine: one thread per loaded instance, stepping its sequences.

Each step asks the scheduler for a plan, has the runner (``runner.py``, the torch half) run
each sequence's forward pass and sample, detokenizes, checks stop strings, and hands chunks to
``emit`` (the control loop's thread-safe inbox).  The engine never touches the socket and the
control loop never runs the model.  One-shot ``Call``s (score, embed, classify) run between
steps.

Messages in (``submit``, ``cancel``, ``credit``, ``stop``) go through one inbox under a
condition variable, which wakes the thread; messages out go through ``emit``.  No state is
shared with the control loop: a ``Request`` is a frozen value, and everything the engine
builds for it lives in its private ``_Live`` record.  This is what lets an engine later live in
its own process.

Backpressure by credits: each chunk emitted costs one credit; the control loop gives it back
(``credit``) once the chunk is written to the client's socket.  A sequence with
``stream_buffer`` chunks emitted and not yet credited is skipped by the scheduler; a credit
wakes the engine at once.  With every sequence blocked (or none) the thread sleeps on the
condition until something arrives.

A sequence's KV cache is never larger than the positions the instance manager reserved for it
(``submit(req, kv_positions)``); once allocated, its true size goes back as a ``kv`` message so
the reservation shrinks to it.  ``stop()`` is cooperative and prompt: the thread checks it
between sequences of a step and, through ``should_stop``, between the windows and inputs of a
call, so shutting down waits for at most one forward pass.  As the thread ends it drops the
model and gives its memory back (``Runner.close``), then emits ``stopped``.  ``stop(swap=True)``
swaps out instead (issue 12): the runner keeps the model, moved to host RAM
(``Runner.offload``), ``stopped`` says ``{"swapped": True}``, and a later engine built on the
same runner (``Engine(..., runner=)``, after ``Runner.onload``) serves it again.

Adapters: ``add_adapter(key, adapter, token)`` installs one between steps (in inbox order, so
a request submitted after it finds it) and answers with an ``adapter`` message, keyed by the
adapter key, carrying its device ``bytes`` or the ``error``, and the ``token`` it was given (the
caller's way to tell this install's answer from an earlier one's); ``drop_adapter(key)`` takes
it out.  Each sequence and call runs with its request's adapter active; a request whose adapter
is gone (detached meanwhile) ends with Cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from llmctl.errors import Cancelled, Internal, InvalidArgument, LlmosdError
from llmosd.serve.chat import TemplateError, fit, render
from llmosd.serve.detok import StopMatcher, StreamDecoder
from llmosd.serve.request import Call, Request, invalid_argument
from llmosd.serve.runner import Runner
from llmosd.serve.scheduler import Scheduler, Seq

log = logging.getLogger("llmosd.engine")

Emit = Callable[[Hashable, str, dict], None]   # (request key, "chunk"|"end"|"error"|"kv"|"stopped", body)
#                                                 or (adapter key, "adapter", {"bytes"} | {"error"}, + "token")
IDLE_WAIT = 1.0        # s: the longest sleep with nothing to do (every message also wakes it)


@dataclass
class _Live:
    """The engine's own state of one running generation (engine thread only)."""
    req: Request
    prompt_ids: list[int]
    dropped_messages: int          # chat: oldest turns left out to fit the context
    cache: Any = None              # runner's KVCache, capacity = the scheduler Seq's
    generator: Any = None          # per-request sampling generator (seeded)
    decoder: StreamDecoder | None = None
    matcher: StopMatcher | None = None
    history: list = field(default_factory=list)       # prompt + output ids (repetition penalty)
    last_token: int = -1
    pending_ids: list = field(default_factory=list)   # ids not yet in a chunk
    pending_lp: list = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    emitted: int = 0               # chunks handed to emit
    credited: int = 0              # chunks the control loop has written to the socket


@dataclass(frozen=True)
class _AdapterOp:
    """An adapter to install (``adapter`` given) or to drop (None), in the inbox's order;
    ``token`` goes back in the install's answer."""
    key: Hashable
    adapter: Any = None
    token: Any = None


class Engine(threading.Thread):
    def __init__(self, instance_id: int, model, tokenizer, device, emit: Emit, *,
                 max_batch: int = 16, stream_buffer: int = 64, own_head=None, runner: Runner | None = None):
        """``own_head``: a merged classifier's head (a ``lora.Adapter`` without LoRA), used
        by its requests that name no adapter; installed here, on the loader's thread, before
        the engine's own starts.  ``runner``: a swapped-in instance's runner (its model,
        adapters and heads already on the device); ``model`` is then ignored."""
        super().__init__(name=f"engine-{instance_id}", daemon=True)
        self.runner = runner if runner is not None else Runner(model, tokenizer, device)
        self.own_head_bytes = self.runner.install(None, own_head) if own_head is not None else 0
        self.tok, self.emit = tokenizer, emit
        self.context = self.runner.context
        self.kv_position_bytes = self.runner.kv_position_bytes
        self.sched = Scheduler(max_batch, self.runner.eos_ids)
        self.stream_buffer = stream_buffer
        self.live: dict[Hashable, _Live] = {}
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []                 # (Request, kv_positions), (Call | _AdapterOp, 0)
        self._cancels: list[tuple] = []
        self._credits: dict[Hashable, int] = {}
        self._stopping = False
        self._swap = False                 # stop(swap=True): keep the model, on the host
        self._halt = threading.Event()     # stop(), readable without the lock inside long work

    # -- called from other threads -----------------------------------------------------------
    def submit(self, req: Request | Call, kv_positions: int = 0) -> None:
        """Run ``req``; a generation's KV cache holds at most ``kv_positions`` (0: no limit)."""
        self._send(lambda: self._inbox.append((req, kv_positions)))

    def add_adapter(self, key: Hashable, adapter, token=None) -> None:
        """Install ``adapter`` (a ``lora.Adapter``) as ``key``; answered by an ``adapter``
        message: {"bytes": device bytes it holds} or {"error": wire error}, with "token":
        ``token``."""
        self._send(lambda: self._inbox.append((_AdapterOp(key, adapter, token), 0)))

    def drop_adapter(self, key: Hashable) -> None:
        """Uninstall the adapter ``key`` (its requests must have ended or been cancelled)."""
        self._send(lambda: self._inbox.append((_AdapterOp(key), 0)))

    def cancel(self, key: Hashable, reason: str = "cancelled", error: LlmosdError | None = None) -> None:
        """Stop a sequence: it ends with finish_reason ``reason``, or fails with ``error``."""
        self._send(lambda: self._cancels.append((key, reason, error)))

    def credit(self, key: Hashable, n: int = 1) -> None:
        """``n`` more of ``key``'s chunks reached the client's socket (unknown keys: ignored)."""
        self._send(lambda: self._credits.__setitem__(key, self._credits.get(key, 0) + n))

    def stop(self, swap: bool = False) -> None:
        """Ask the thread to end: it finishes the forward pass it is in, abandons the rest of
        a step or call, fails every open request with Cancelled and emits ``stopped``.  With
        ``swap`` the model is kept, moved to host RAM, for a later engine on ``self.runner``."""
        self._swap = swap
        self._halt.set()
        self._send(lambda: setattr(self, "_stopping", True))

    def _send(self, put: Callable[[], None]) -> None:
        with self._cv:
            put()
            self._cv.notify()

    # -- engine thread -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            with self.runner.session():
                while self._admit():
                    plan = self.sched.schedule(self._blocked)
                    if not plan:
                        with self._cv:        # idle, or every sequence waits for credits
                            if not (self._inbox or self._cancels or self._credits or self._stopping):
                                self._cv.wait(IDLE_WAIT)
                        continue
                    for key, prefill in [(k, True) for k in plan.prefill] + [(k, False) for k in plan.decode]:
                        if self._halt.is_set():
                            break
                        self._run(key, prefill)
        except Exception:  # a bug here must not leave clients hanging
            log.exception("engine thread crashed")
            for key in list(self.live):
                self._fail(key, Internal("the engine crashed; see the daemon log"))
        finally:
            for key in list(self.live):
                self._drop(key)
            swapped = False
            try:
                if self._swap:
                    self.runner.offload()
                    swapped = True
                else:
                    self.runner.close()
            except Exception:
                log.exception("swapping out failed: the model is dropped")
                self.runner.close()
            finally:
                self.emit(None, "stopped", {"swapped": True} if swapped else {})

    def _admit(self) -> bool:
        """Take what arrived: new requests start, credits and cancels apply.  False once
        stopping (nothing new starts on a stopping engine)."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
            credits, self._credits = self._credits, {}
            stopping = self._stopping
        if stopping:
            for req, _ in inbox:
                if not isinstance(req, _AdapterOp):
                    self.emit(req.key, "error", Cancelled("the instance stopped").to_wire())
            inbox = []
        for req, kv_positions in inbox:
            if isinstance(req, _AdapterOp):
                self._adapter(req)
            elif isinstance(req, Call):
                self._call(req)
            else:
                self._start(req, kv_positions)
        for key, n in credits.items():
            if key in self.live:
                self.live[key].credited += n
        for key, reason, error in cancels:
            seq = self.sched.finish(key, reason)
            if seq is not None:
                if error is not None:
                    self._fail(key, error)
                else:
                    self._end(key, reason, seq.generated)
        return not stopping

    def _adapter(self, op: _AdapterOp) -> None:
        if op.adapter is None:
            self.runner.uninstall(op.key)
            return
        try:
            n = self.runner.install(op.key, op.adapter)
        except LlmosdError as e:
            self.emit(op.key, "adapter", {"error": e.to_wire(), "token": op.token})
        else:
            self.emit(op.key, "adapter", {"bytes": n, "token": op.token})

    def _start(self, req: Request, kv_positions: int) -> None:
        """Tokenize ``req``, check it fits, allocate its cache and add it to the scheduler."""
        if req.adapter is not None and req.adapter not in self.runner.adapters:
            self._fail(req.key, Cancelled("the request's adapter was unloaded before it started"))
            return
        try:
            ids, dropped = self._encode(req)
        except TemplateError as e:
            self._fail(req.key, invalid_argument(e, hint="use generate with a plain prompt "
                                                 "if the model has no chat template"))
            return
        n = len(ids)
        if n == 0 or n > self.context:
            self._fail(req.key, InvalidArgument(
                "the prompt is empty" if n == 0 else
                f"the prompt is {n} tokens, more than the model's context of {self.context}",
                hint="" if n == 0 else "shorten the prompt"))
            return
        cap = min(self.context, n + req.max_tokens)
        if kv_positions:                   # never more than admission reserved
            if n > kv_positions:
                self._fail(req.key, InvalidArgument(
                    f"the prompt is {n} tokens, more than the {kv_positions} positions "
                    "reserved for it from its length", hint="shorten the prompt"))
                return
            cap = min(cap, kv_positions)
        try:
            cache = self.runner.new_cache(cap)
        except LlmosdError as e:
            self._fail(req.key, e)
            return
        self.sched.add(Seq(req.key, n, req.max_tokens, cap))
        self.emit(req.key, "kv", {"bytes": cache.nbytes(), "positions": cap})
        self.live[req.key] = _Live(req, ids, dropped, cache, self.runner.new_generator(req.sampling.seed),
                                   StreamDecoder(self.tok, ids), StopMatcher(list(req.stops)), list(ids))

    def _encode(self, req: Request) -> tuple[list[int], int]:
        """The prompt's token ids, and how many chat messages were dropped to fit."""
        if req.messages is None:
            return self.tok.encode(req.prompt, add_bos=req.add_bos), 0
        template = getattr(self.tok, "chat_template", None)
        specials = {"bos_token": self.tok.token(self.tok.bos_id), "eos_token": self.tok.token(self.tok.eos_id)}
        encoded = {}

        def length(msgs):
            text = render(template, msgs, **specials)
            encoded[len(msgs)] = self.tok.encode(text, add_bos=False)   # the template writes any BOS
            return len(encoded[len(msgs)])
        # a long conversation loses its oldest turns, leaving room to answer
        msgs, dropped = fit(list(req.messages), length, self.context - min(req.max_tokens, self.context // 4))
        return encoded[len(msgs)], dropped

    def _call(self, call: Call) -> None:
        try:
            result = self.runner.call(call, self._halt.is_set)
        except LlmosdError as e:
            self.emit(call.key, "error", e.to_wire())
        else:
            self.emit(call.key, "end", result)

    def _blocked(self, key) -> bool:
        s = self.live[key]
        return s.emitted - s.credited >= self.stream_buffer

    def _run(self, key, prefill: bool) -> None:
        s = self.live[key]
        if prefill:
            ids, pos = s.prompt_ids, 0
        else:
            ids, pos = [s.last_token], len(s.prompt_ids) + self.sched.seqs[key].generated - 1
        try:
            out = self.runner.step(s.cache, ids, pos, s.req.sampling, s.generator, s.history,
                                   s.req.logprobs, s.req.adapter)
        except LlmosdError as e:
            self.sched.finish(key, "error")
            self._fail(key, e)
            return
        token = out.token
        now = time.perf_counter()
        s.first_token_at = s.first_token_at or now
        s.last_token_at = now
        s.last_token = token
        s.history.append(token)
        eos = token in self.sched.eos_ids
        text = "" if eos else s.decoder.push(token)
        if not eos:
            s.pending_ids.append(token)
            if s.req.logprobs:
                s.pending_lp.append({"id": token, "token": self.tok.decode([token]), "logprob": out.logprob,
                                     "top": [{"id": i, "token": self.tok.decode([i]), "logprob": v}
                                             for i, v in out.top]})
        text, stopped = s.matcher.feed(text)
        seq = self.sched.update(key, token, stop_hit=stopped)
        if seq.finish_reason is not None and not stopped:
            text += s.matcher.feed(s.decoder.flush())[0] + s.matcher.flush()
        if text or (seq.finish_reason is not None and s.pending_ids):
            self._chunk(s, text)
        if seq.finish_reason is not None:
            self._end(key, seq.finish_reason, seq.generated)

    def _chunk(self, s: _Live, text: str) -> None:
        s.emitted += 1
        ids, s.pending_ids = s.pending_ids, []
        body = {"text": text, "token_ids": ids}
        if s.req.logprobs:
            body["logprobs"], s.pending_lp = s.pending_lp, []
        self.emit(s.req.key, "chunk", body)

    def _end(self, key, reason: str, generated: int) -> None:
        s = self.live.pop(key, None)
        if s is None:
            return
        t0, t1, tl = s.req.submitted, s.first_token_at, s.last_token_at
        stats = {
            "finish_reason": reason,
            "prompt_tokens": len(s.prompt_ids),
            "generated_tokens": generated,
            "ttft_ms": round((t1 - t0) * 1000, 3) if t1 else None,
            "total_ms": round((time.perf_counter() - t0) * 1000, 3),
            "tokens_per_s": round((generated - 1) / (tl - t1), 3) if t1 and tl > t1 and generated > 1 else None,
        }
        if s.req.messages is not None:
            stats["dropped_messages"] = s.dropped_messages
        s.cache = None
        self.emit(key, "end", stats)

    def _fail(self, key, err: LlmosdError) -> None:
        s = self.live.pop(key, None)
        if s is not None:
            s.cache = None
        self.emit(key, "error", err.to_wire())

    def _drop(self, key) -> None:
        s = self.live.pop(key, None)
        if s is not None:
            s.cache = None
            self.emit(key, "error", Cancelled("the instance stopped").to_wire())
