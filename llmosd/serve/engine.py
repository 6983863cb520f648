"""The engine: one thread per loaded instance, stepping all its sequences together.

Each step (issue 13) takes what arrived, asks the scheduler for a plan (``Scheduler.schedule``:
the decodes of the running sequences and prefill chunks of the waiting ones, within one token
budget and the paged KV pool's blocks), has the runner (``runner.py``, the torch half) run the
whole plan as one batch (``Runner.run``: one forward for the decodes, one per prefill chunk),
hands each sampled token to the scheduler (``postprocess``: the block table grows, the
sequence may finish), detokenizes, checks stop strings, and hands chunks to ``emit`` (the
control loop's thread-safe inbox).  Beside that batch a step advances the one-shot call
(score, embed, classify) in progress by one slice of at most ``max_prefill_tokens`` tokens
(``calls.CallQueue``: one call at a time, FIFO, the others wait holding nothing), so a long
call never stops generations and generations never starve a call.  A sequence the scheduler preempts (the pool ran out) loses its KV cache only: what it
streamed stays, and it is recomputed later from its prompt and output (greedy output is the
same).  The engine never touches the socket and the control loop never runs the model.

Messages in (``submit``, ``cancel``, ``credit``, ``stop``, adapters) go through one inbox under a
condition variable, which wakes the thread; messages out go through ``emit``.  No state is
shared with the control loop: a ``Request`` is a frozen value, and everything the engine
builds for it lives in its private ``_Live`` record.  The pool's and queue's state goes out
as ``blocks`` messages ({kv_blocks_total, kv_blocks_used, kv_block_size, waiting, running}),
at most every ``REPORT_S`` while busy and always before the thread sleeps.

Admission is the scheduler's: past ``max_waiting`` queued requests a new one fails with Busy;
a prompt that could never fit the pool fails with InvalidArgument naming the positions and
the fix (raise max_kv_bytes).  Cancel and finish give a sequence's blocks back at once.

Backpressure by credits: each chunk emitted costs one credit; the control loop gives it back
(``credit``) once the chunk is written to the client's socket.  A sequence with
``stream_buffer`` chunks emitted and not yet credited is skipped by the scheduler; a credit
wakes the engine at once.  With every sequence blocked (or none) the thread sleeps on the
condition until something arrives.

``stop()`` is cooperative and prompt: the thread checks it between steps and call slices, so
shutting down waits for at most one batch.  As the thread ends it drops the model and gives its
memory back (``Runner.close``), then emits ``stopped``.  ``stop(swap=True)`` swaps out instead
(issue 12): the runner keeps the model, moved to host RAM (``Runner.offload``), ``stopped``
says ``{"swapped": True}``, and a later engine built on the same runner (``Engine(...,
runner=)``, after ``Runner.onload``) serves it again.

Adapters: ``add_adapter(key, adapter, token)`` installs one between steps (in inbox order, so
a request submitted after it finds it) and answers with an ``adapter`` message, keyed by the
adapter key, carrying its device ``bytes`` or the ``error``, and the ``token`` it was given;
``drop_adapter(key)`` takes it out.  Each sequence and call runs with its request's adapter
(the runner groups a batch by adapter); a request whose adapter is gone ends with Cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from llmctl.errors import Busy, Cancelled, Internal, InvalidArgument, LlmosdError
from llmosd.models.loader import release_free_heap
from llmosd.serve.blocks import BlockManager, adapter_salt
from llmosd.serve.calls import CallQueue
from llmosd.serve.chat import TemplateError, fit, render
from llmosd.serve.detok import StopMatcher, StreamDecoder
from llmosd.serve.request import Call, Request, invalid_argument
from llmosd.serve.runner import Runner, SeqWork
from llmosd.serve.scheduler import Scheduler, Seq

log = logging.getLogger("llmosd.engine")

Emit = Callable[[Hashable, str, dict], None]   # (request key, "chunk"|"end"|"error", body),
#   (None, "blocks"|"stopped", body), or (adapter key, "adapter", {"bytes"} | {"error"}, + "token")
IDLE_WAIT = 1.0        # s: the longest sleep with nothing to do (every message also wakes it)
REPORT_S = 0.2         # s: the most often a busy engine reports its blocks and queue


def default_blocks(context: int, block_size: int, max_batch: int) -> int:
    """A pool's blocks when none is given (tests, tools): ``max_batch`` full contexts."""
    return max(1, max_batch) * -(-context // block_size)


def client_of(key: Hashable) -> Hashable:
    """The fairness unit of a request: its peer (keys are (peer identity, request id))."""
    return key[0] if isinstance(key, tuple) and key else key


@dataclass
class _Live:
    """The engine's own state of one generation (engine thread only)."""
    req: Request
    prompt_ids: list[int]
    dropped_messages: int          # chat: oldest turns left out to fit the context
    generator: Any = None          # per-request sampling generator (seeded)
    decoder: StreamDecoder | None = None
    matcher: StopMatcher | None = None
    history: list = field(default_factory=list)       # prompt + output ids (repetition penalty)
    pending_ids: list = field(default_factory=list)   # ids not yet in a chunk
    pending_lp: list = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    emitted: int = 0               # chunks handed to emit
    credited: int = 0              # chunks the control loop has written to the socket
    preempted: int = 0             # times its KV cache was taken back (recomputed)


@dataclass(frozen=True)
class _AdapterOp:
    """An adapter to install (``adapter`` given) or to drop (None), in the inbox's order;
    ``token`` goes back in the install's answer."""
    key: Hashable
    adapter: Any = None
    token: Any = None


class Engine(threading.Thread):
    def __init__(self, instance_id: int, model, tokenizer, device, emit: Emit, *,
                 max_batch: int = 16, stream_buffer: int = 64, max_prefill_tokens: int = 128,
                 max_waiting: int = 256, num_blocks: int = 0, block_size: int = 16,
                 compile: str = "off", own_head=None, runner: Runner | None = None):
        """``num_blocks`` x ``block_size`` positions: the instance's KV pool, allocated here
        (0: ``default_blocks``); OutOfMemory if it does not fit.  ``compile``: the config's
        key (CUDA graphs of decode steps unless "off").  ``own_head``: a merged
        classifier's head (a ``lora.Adapter`` without LoRA), used by its requests that name no
        adapter; installed here, on the loader's thread, before the engine's own starts.
        ``runner``: a swapped-in instance's runner (its model, adapters, heads and pool already
        on the device); ``model``, ``num_blocks`` and ``block_size`` are then ignored."""
        super().__init__(name=f"engine-{instance_id}", daemon=True)
        if runner is None:
            context = model.config.max_position_embeddings
            runner = Runner(model, tokenizer, device,
                            num_blocks=num_blocks or default_blocks(context, block_size, max_batch),
                            block_size=block_size, compile=compile)
        self.runner = runner
        self.own_head_bytes = self.runner.install(None, own_head) if own_head is not None else 0
        self.tok, self.emit = tokenizer, emit
        self.context = self.runner.context
        self.eos_ids = set(self.runner.eos_ids)
        self.blocks = BlockManager(self.runner.num_blocks, self.runner.block_size)
        self.pool_positions = self.blocks.num_blocks * self.blocks.block_size
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.sched = Scheduler(self.blocks, max_batch=max(1, max_batch), max_prefill_tokens=self.max_prefill_tokens,
                               max_waiting=max(1, max_waiting), eos_ids=self.eos_ids)
        self.stream_buffer = stream_buffer
        self.max_waiting = max(1, max_waiting)
        self.live: dict[Hashable, _Live] = {}
        self.calls = CallQueue(lambda call, n: self.runner.start_call(call, n), lambda *a: self.emit(*a),
                               max_waiting=self.max_waiting, slice_tokens=self.max_prefill_tokens)
        self._cv = threading.Condition()
        self._inbox: list = []                        # Request | Call | _AdapterOp, in order
        self._cancels: list[tuple] = []
        self._credits: dict[Hashable, int] = {}
        self._stopping = False
        self._swap = False                 # stop(swap=True): keep the model, on the host
        self._halt = threading.Event()     # stop(), readable without the lock inside long work
        self._reported: dict | None = None
        self._reported_at = 0.0

    @property
    def pool_bytes(self) -> int:
        """Bytes of the instance's KV pool (the runner's)."""
        return int(getattr(self.runner, "pool_bytes", 0) or 0)

    # -- called from other threads -----------------------------------------------------------
    def submit(self, req: Request | Call) -> None:
        """Run ``req`` (a generation or a one-shot call)."""
        self._send(lambda: self._inbox.append(req))

    def add_adapter(self, key: Hashable, adapter, token=None) -> None:
        """Install ``adapter`` (a ``lora.Adapter``) as ``key``; answered by an ``adapter``
        message: {"bytes": device bytes it holds} or {"error": wire error}, with "token":
        ``token``."""
        self._send(lambda: self._inbox.append(_AdapterOp(key, adapter, token)))

    def drop_adapter(self, key: Hashable) -> None:
        """Uninstall the adapter ``key`` (its requests must have ended or been cancelled)."""
        self._send(lambda: self._inbox.append(_AdapterOp(key)))

    def cancel(self, key: Hashable, reason: str = "cancelled", error: LlmosdError | None = None) -> None:
        """Stop a sequence or call: it ends with finish_reason ``reason``, or fails with
        ``error`` (a call always fails: with ``error``, else Cancelled)."""
        self._send(lambda: self._cancels.append((key, reason, error)))

    def credit(self, key: Hashable, n: int = 1) -> None:
        """``n`` more of ``key``'s chunks reached the client's socket (unknown keys: ignored)."""
        self._send(lambda: self._credits.__setitem__(key, self._credits.get(key, 0) + n))

    def stop(self, swap: bool = False) -> None:
        """Ask the thread to end: it finishes the batch it is in, fails every open request
        with Cancelled and emits ``stopped``.  With ``swap`` the model is kept, moved to host
        RAM, for a later engine on ``self.runner``."""
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
            trimmed = True
            with self.runner.session():
                while self._admit():
                    worked = self._step()
                    if not self._halt.is_set():
                        worked = self.calls.step() or worked
                    if worked:
                        self._report()
                        trimmed = False
                        continue
                    self._report(force=True)
                    if not self.live and not trimmed:     # idle: malloc's free pages to the OS
                        release_free_heap()
                        trimmed = True
                    with self._cv:        # idle, or every sequence waits for credits
                        if not (self._inbox or self._cancels or self._credits or self._stopping):
                            self._cv.wait(IDLE_WAIT)
        except Exception:  # a bug here must not leave clients hanging
            log.exception("engine thread crashed")
            for key in list(self.live):
                self._fail(key, Internal("the engine crashed; see the daemon log"))
            self.calls.fail_all(Internal("the engine crashed; see the daemon log"))
        finally:
            for key in list(self.live):
                self._drop(key)
            self.calls.fail_all(Cancelled("the instance stopped"))
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
            for req in inbox:
                if not isinstance(req, _AdapterOp):
                    self.emit(req.key, "error", Cancelled("the instance stopped").to_wire())
            inbox = []
        for req in inbox:
            if isinstance(req, _AdapterOp):
                self._adapter(req)
            elif isinstance(req, Call):
                self.calls.submit(req)
            else:
                self._start(req)
        for key, n in credits.items():
            if key in self.live:
                self.live[key].credited += n
        for key, reason, error in cancels:
            self._cancel(key, reason, error)
        return not stopping

    def _cancel(self, key, reason: str, error: LlmosdError | None) -> None:
        seq = self.sched.finish(key, reason)           # its blocks go back to the pool now
        if seq is not None or key in self.live:
            if error is not None:
                self._fail(key, error)
            else:
                self._end(key, reason, seq.generated if seq is not None else 0)
            return
        self.calls.cancel(key, error or Cancelled(f"request cancelled ({reason})"))

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

    def _start(self, req: Request) -> None:
        """Tokenize ``req``, check it can ever run here, and queue it in the scheduler
        (Busy past max_waiting)."""
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
        err = self._unfit(n)
        if err is not None:
            self._fail(req.key, err)
            return
        cap = min(self.context, n + req.max_tokens, self.pool_positions)
        try:
            self.sched.add(Seq(req.key, client_of(req.key), list(ids), n, req.max_tokens, cap,
                               salt=adapter_salt(req.adapter)))
        except Busy as e:
            self._fail(req.key, e)
            return
        except ValueError as e:
            self._fail(req.key, invalid_argument(e, hint="shorten the prompt, or raise max_kv_bytes "
                                                 "(LLMOSD_MAX_KV_BYTES) for the daemon"))
            return
        self.live[req.key] = _Live(req, ids, dropped, self.runner.new_generator(req.sampling.seed),
                                   StreamDecoder(self.tok, ids), StopMatcher(list(req.stops)), list(ids))

    def _unfit(self, n: int) -> InvalidArgument | None:
        """Why a prompt of ``n`` tokens can never run on this instance, if it cannot."""
        if n == 0:
            return InvalidArgument("the prompt is empty")
        if n > self.context:
            return InvalidArgument(f"the prompt is {n} tokens, more than the model's context of {self.context}",
                                   hint="shorten the prompt")
        if n > self.pool_positions:
            return InvalidArgument(
                f"the prompt is {n} positions; this instance's KV-cache pool holds {self.pool_positions} "
                f"({self.blocks.num_blocks} blocks of {self.blocks.block_size})",
                hint="shorten the prompt, or raise max_kv_bytes (LLMOSD_MAX_KV_BYTES) for the daemon "
                     "and load the model again")
        return None

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
        room = min(self.context, self.pool_positions - 1)
        msgs, dropped = fit(list(req.messages), length, room - min(req.max_tokens, room // 4))
        return encoded[len(msgs)], dropped

    # -- generations ---------------------------------------------------------------------------
    def _blocked(self, key) -> bool:
        s = self.live.get(key)
        return s is not None and s.emitted - s.credited >= self.stream_buffer

    def _step(self) -> bool:
        """One batch: the scheduler's plan run by the runner, its tokens taken.  False when
        there was nothing to run."""
        plan = self.sched.schedule(self._blocked)
        for key in plan.preempted:
            if key in self.live:
                self.live[key].preempted += 1
        for key in plan.finished:              # could not grow even alone (the pool's end)
            s = self.live.get(key)
            if s is not None:
                self._end(key, "context", len(s.history) - len(s.prompt_ids))
        keys, work = [], []
        for ch in plan.prefill:
            seq = self.sched.seqs[ch.key]
            keys.append(ch.key)
            work.append(self._work(ch.key, seq.tokens[ch.start:ch.start + ch.length], ch.start, ch.sample))
        for key in plan.decode:
            seq = self.sched.seqs[key]
            keys.append(key)
            work.append(self._work(key, seq.tokens[-1:], len(seq.tokens) - 1, True))
        if not work:
            return False
        try:
            out = self.runner.run(work)
        except LlmosdError as e:
            for key in dict.fromkeys(keys):
                self.sched.finish(key, "error")
                self._fail(key, e)
            return True
        for key, got in zip(keys, out):
            if isinstance(got, LlmosdError):      # its adapter was detached meanwhile
                self.sched.finish(key, "error")
                self._fail(key, got)
            elif got is not None and key in self.live:
                self._token(key, got)
        return True

    def _work(self, key, ids: list[int], start: int, sample: bool) -> SeqWork:
        s = self.live[key]
        return SeqWork(key=key, ids=list(ids), start=start, block_table=self.sched.table(key), sample=sample,
                       sampling=s.req.sampling, generator=s.generator, history=s.history,
                       logprobs=s.req.logprobs, adapter=s.req.adapter)

    def _token(self, key, out) -> None:
        """One sampled token of ``key``: detokenized, stop strings checked, the scheduler told
        (blocks grow, it may finish), chunks and the end emitted."""
        s = self.live[key]
        token = out.token
        now = time.perf_counter()
        s.first_token_at = s.first_token_at or now
        s.last_token_at = now
        s.history.append(token)
        eos = token in self.eos_ids
        text = "" if eos else s.decoder.push(token)
        if not eos:
            s.pending_ids.append(token)
            if s.req.logprobs:
                s.pending_lp.append({"id": token, "token": self.tok.decode([token]), "logprob": out.logprob,
                                     "top": [{"id": i, "token": self.tok.decode([i]), "logprob": v}
                                             for i, v in out.top]})
        text, stopped = s.matcher.feed(text)
        seq = self.sched.postprocess(key, token, stop_hit=stopped)
        if seq.finish_reason is not None and not stopped:
            text += s.matcher.feed(s.decoder.flush())[0] + s.matcher.flush()
        if text or (seq.finish_reason is not None and s.pending_ids):
            self._chunk(s, text)
        if seq.finish_reason is not None:
            self.sched.finish(key, seq.finish_reason)      # (already: a no-op)
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
        if s.preempted:
            stats["preempted"] = s.preempted
        if s.req.messages is not None:
            stats["dropped_messages"] = s.dropped_messages
        self.emit(key, "end", stats)

    def _fail(self, key, err: LlmosdError) -> None:
        self.live.pop(key, None)
        self.emit(key, "error", err.to_wire())

    def _drop(self, key) -> None:
        self.sched.finish(key, "stopped")
        if self.live.pop(key, None) is not None:
            self.emit(key, "error", Cancelled("the instance stopped").to_wire())

    # -- reports -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The pool's and queue's state as the table's rows show it."""
        st = self.sched.stats()
        return {"kv_blocks_total": self.blocks.num_blocks, "kv_blocks_used": self.blocks.used_count,
                "kv_block_size": self.blocks.block_size, "waiting": int(st.get("waiting", 0)) + len(self.calls),
                "running": int(st.get("running", 0))}

    def _report(self, force: bool = False) -> None:
        """Emit ``blocks`` when the stats changed: at most every REPORT_S while busy
        (``force``: now, before the thread sleeps, so the last state is always told)."""
        now = time.monotonic()
        if not force and now - self._reported_at < REPORT_S:
            return
        st = self.stats()
        if st != self._reported:
            self._reported, self._reported_at = st, now
            self.emit(None, "blocks", st)
