"""The engine: one thread per loaded instance, stepping its sequences.

Each step asks the scheduler for a plan, runs the forward passes, samples, detokenizes, checks
stop strings, and hands chunks to ``emit`` (the control loop's thread-safe inbox).  The engine
never touches the socket and the control loop never runs the model.

Sequences run one at a time inside a step (batch 1 per forward pass), so a request's output is
bit-identical to a plain forward pass of the same weights however many others share the step.
One-shot ``Call``s (score, embed, classify: ``evaluate.py``) run between steps.

A sequence's KV cache is never larger than the positions the instance manager reserved for it
(``Request.kv_positions``); once allocated, its true size goes back as a ``kv`` message so the
reservation shrinks to it.  ``stop()`` is cooperative and prompt: the thread checks it between
sequences of a step and, through ``should_stop``, between the windows and inputs of a call, so
shutting down waits for at most one forward pass.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from llmctl.errors import Cancelled, Internal, InvalidArgument, LlmosdError, OutOfMemory
import llmosd.serve.evaluate as evaluate
from llmosd.serve.chat import TemplateError, fit, render
from llmosd.serve.detok import StopMatcher, StreamDecoder
from llmosd.models.llama import KVCache, Llama
from llmosd.serve.sampling import SamplingParams, make_generator, sample, top_logprobs
from llmosd.serve.scheduler import Scheduler, Seq, kv_position_bytes

log = logging.getLogger("llmosd.engine")

Emit = Callable[[Hashable, str, dict], None]   # (request key, "chunk"|"end"|"error"|"kv", body)


@dataclass
class Request:
    """One generation, shared by the control loop (which counts ``sent``) and the engine."""
    key: Hashable
    prompt: str
    max_tokens: int
    sampling: SamplingParams
    stops: list[str] = field(default_factory=list)
    add_bos: bool = True
    messages: list | None = None   # chat: rendered with the model's template instead of prompt
    logprobs: int = 0              # report each token's logprob and this many alternatives
    dropped_messages: int = 0      # chat: oldest turns left out to fit the context
    kv_positions: int = 0          # KV positions reserved for it by admission; 0 = no limit
    prompt_ids: list[int] = field(default_factory=list)   # set by the engine (tokenizing is work)
    submitted: float = field(default_factory=time.perf_counter)
    emitted: int = 0               # chunks handed to emit (engine thread writes)
    sent: int = 0                  # chunks written to the socket (control loop writes)
    # engine-private
    cache: KVCache | None = None
    generator: torch.Generator | None = None
    decoder: StreamDecoder | None = None
    matcher: StopMatcher | None = None
    last_token: int = -1
    history: list = field(default_factory=list)       # prompt + output ids (repetition penalty)
    pending_ids: list = field(default_factory=list)
    pending_lp: list = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass
class Call:
    """A one-shot evaluation: ``evaluate.FUNCTIONS[name](model, tok, device, **args)``."""
    key: Hashable
    name: str
    args: dict


class Engine(threading.Thread):
    def __init__(self, instance_id: int, model: Llama, tokenizer, device: torch.device,
                 emit: Emit, *, max_batch: int = 16, stream_buffer: int = 64):
        super().__init__(name=f"engine-{instance_id}", daemon=True)
        self.model, self.tok, self.device, self.emit = model, tokenizer, device, emit
        self.context = model.config.max_position_embeddings
        c = model.config
        self.kv_dtype = model.model.embed_tokens.weight.dtype
        self.kv_position_bytes = kv_position_bytes(c.num_hidden_layers, c.num_key_value_heads,
                                                   c.head_dim, self.kv_dtype.itemsize)
        eos = model.config.eos_ids() | tokenizer.eos_ids()
        self.sched = Scheduler(max_batch, eos)
        self.stream_buffer = stream_buffer
        self.reqs: dict[Hashable, Request] = {}
        self._cv = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[tuple] = []
        self._stopping = False
        self._halt = threading.Event()     # stop(), readable without the lock inside long work

    # -- called from other threads -----------------------------------------------------------
    def submit(self, req: "Request | Call") -> None:
        with self._cv:
            self._inbox.append(req)
            self._cv.notify()

    def cancel(self, key: Hashable, reason: str = "cancelled", error: LlmosdError | None = None) -> None:
        """Stop a sequence: it ends with finish_reason ``reason``, or fails with ``error``."""
        with self._cv:
            self._cancels.append((key, reason, error))
            self._cv.notify()

    def stop(self) -> None:
        """Ask the thread to end: it finishes the forward pass it is in, abandons the rest of
        a step or call, fails every open request with Cancelled and emits ``stopped``."""
        self._halt.set()
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- engine thread -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            with torch.inference_mode():
                while self._admit():
                    plan = self.sched.schedule(self._blocked)
                    if not plan:
                        with self._cv:
                            if not (self._inbox or self._cancels or self._stopping):
                                # all sequences idle or waiting on slow readers: nap briefly
                                self._cv.wait(0.02 if self.sched.seqs else 1.0)
                        continue
                    for key, prefill in [(k, True) for k in plan.prefill] + [(k, False) for k in plan.decode]:
                        if self._halt.is_set():
                            break
                        self._run(key, prefill)
        except Exception:  # a bug here must not leave clients hanging
            log.exception("engine thread crashed")
            for key in list(self.reqs):
                self._fail(key, Internal("the engine crashed; see the daemon log"))
        finally:
            for key in list(self.reqs):
                self._drop(key)
            self.model = None
            self.emit(None, "stopped", {})

    def _admit(self) -> bool:
        with self._cv:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
            stopping = self._stopping
        if stopping:                       # nothing new starts on a stopping engine
            for req in inbox:
                self.emit(req.key, "error", Cancelled("the instance stopped").to_wire())
            inbox = []
        for req in inbox:
            if isinstance(req, Call):
                self._call(req)
                continue
            try:
                req.prompt_ids = self._encode(req)
            except TemplateError as e:
                self._fail(req.key, InvalidArgument(str(e), hint="use generate with a plain prompt "
                                                    "if the model has no chat template"), req)
                continue
            n = len(req.prompt_ids)
            if n == 0 or n > self.context:
                self._fail(req.key, InvalidArgument(
                    "the prompt is empty" if n == 0 else
                    f"the prompt is {n} tokens, more than the model's context of {self.context}",
                    hint="" if n == 0 else "shorten the prompt"), req)
                continue
            cap = min(self.context, n + req.max_tokens)
            if req.kv_positions:           # never more than admission reserved
                if n > req.kv_positions:
                    self._fail(req.key, InvalidArgument(
                        f"the prompt is {n} tokens, more than the {req.kv_positions} positions "
                        "reserved for it from its length", hint="shorten the prompt"), req)
                    continue
                cap = min(cap, req.kv_positions)
            try:
                self.sched.add(Seq(req.key, len(req.prompt_ids), req.max_tokens, cap))
                req.cache = KVCache(self.model.config, cap, device=self.device, dtype=self.kv_dtype)
            except torch.OutOfMemoryError:
                self.sched.finish(req.key, "error")
                self._fail(req.key, OutOfMemory("no memory for this request's KV cache"), req)
                continue
            self.emit(req.key, "kv", {"bytes": req.cache.nbytes(), "positions": cap})
            req.generator = make_generator(req.sampling.seed)
            req.decoder = StreamDecoder(self.tok, req.prompt_ids)
            req.matcher = StopMatcher(req.stops)
            req.history = list(req.prompt_ids)
            self.reqs[req.key] = req
        for key, reason, error in cancels:
            seq = self.sched.finish(key, reason)
            if seq is not None:
                if error is not None:
                    self._fail(key, error)
                else:
                    self._end(key, reason, seq.generated)
        return not stopping

    def _encode(self, req: Request) -> list[int]:
        if req.messages is None:
            return self.tok.encode(req.prompt, add_bos=req.add_bos)
        template = getattr(self.tok, "chat_template", None)
        specials = {"bos_token": self.tok.token(self.tok.bos_id), "eos_token": self.tok.token(self.tok.eos_id)}
        encoded = {}

        def length(msgs):
            text = render(template, msgs, **specials)
            encoded[len(msgs)] = (text, self.tok.encode(text, add_bos=False))   # the template writes any BOS
            return len(encoded[len(msgs)][1])
        # a long conversation loses its oldest turns, leaving room to answer
        msgs, req.dropped_messages = fit(req.messages, length, self.context - min(req.max_tokens, self.context // 4))
        req.prompt, ids = encoded[len(msgs)]
        return ids

    def _call(self, call: Call) -> None:
        try:
            result = evaluate.FUNCTIONS[call.name](self.model, self.tok, self.device,
                                                   should_stop=self._halt.is_set, **call.args)
        except evaluate.Stopped:
            self.emit(call.key, "error", Cancelled(f"the instance stopped during {call.name}").to_wire())
        except ValueError as e:
            self.emit(call.key, "error", InvalidArgument(str(e)).to_wire())
        except torch.OutOfMemoryError:
            self.emit(call.key, "error", OutOfMemory(f"ran out of memory during {call.name}").to_wire())
        except Exception as e:
            log.exception("%s failed", call.name)
            self.emit(call.key, "error", Internal(f"{call.name} failed: {e}").to_wire())
        else:
            self.emit(call.key, "end", result)

    def _blocked(self, key) -> bool:
        r = self.reqs[key]
        return r.emitted - r.sent >= self.stream_buffer

    def _run(self, key, prefill: bool) -> None:
        req = self.reqs[key]
        try:
            if prefill:
                ids = torch.tensor([req.prompt_ids], device=self.device)
                logits = self.model(ids, req.cache, 0, last_only=True)
            else:
                pos = len(req.prompt_ids) + self.sched.seqs[key].generated - 1
                ids = torch.tensor([[req.last_token]], device=self.device)
                logits = self.model(ids, req.cache, pos)
            seen = (torch.tensor(req.history, device=self.device)
                    if req.sampling.repetition_penalty != 1.0 else None)
            token = sample(logits[0, -1], req.sampling, req.generator, seen)
            if req.logprobs:
                lp, top = top_logprobs(logits[0, -1], token, req.logprobs)
        except torch.OutOfMemoryError:
            self.sched.finish(key, "error")
            self._fail(key, OutOfMemory("ran out of memory while generating"))
            return
        except Exception as e:
            log.exception("forward pass failed")
            self.sched.finish(key, "error")
            self._fail(key, Internal(f"forward pass failed: {e}"))
            return
        now = time.perf_counter()
        req.first_token_at = req.first_token_at or now
        req.last_token_at = now
        req.last_token = token
        req.history.append(token)
        eos = token in self.sched.eos_ids
        text = "" if eos else req.decoder.push(token)
        if not eos:
            req.pending_ids.append(token)
            if req.logprobs:
                req.pending_lp.append({"id": token, "token": self.tok.decode([token]), "logprob": lp,
                                       "top": [{"id": i, "token": self.tok.decode([i]), "logprob": v}
                                               for i, v in top]})
        out, stopped = req.matcher.feed(text)
        seq = self.sched.update(key, token, stop_hit=stopped)
        if seq.finish_reason is not None and not stopped:
            out += req.matcher.feed(req.decoder.flush())[0] + req.matcher.flush()
        if out or (seq.finish_reason is not None and req.pending_ids):
            self._chunk(req, out)
        if seq.finish_reason is not None:
            self._end(key, seq.finish_reason, seq.generated)

    def _chunk(self, req: Request, text: str) -> None:
        req.emitted += 1
        ids, req.pending_ids = req.pending_ids, []
        body = {"text": text, "token_ids": ids}
        if req.logprobs:
            body["logprobs"], req.pending_lp = req.pending_lp, []
        self.emit(req.key, "chunk", body)

    def _end(self, key, reason: str, generated: int) -> None:
        req = self.reqs.pop(key, None)
        if req is None:
            return
        t0, t1, tl = req.submitted, req.first_token_at, req.last_token_at
        stats = {
            "finish_reason": reason,
            "prompt_tokens": len(req.prompt_ids),
            "generated_tokens": generated,
            "ttft_ms": round((t1 - t0) * 1000, 3) if t1 else None,
            "total_ms": round((time.perf_counter() - t0) * 1000, 3),
            "tokens_per_s": round((generated - 1) / (tl - t1), 3) if t1 and tl > t1 and generated > 1 else None,
        }
        if req.messages is not None:
            stats["dropped_messages"] = req.dropped_messages
        req.cache = None
        self.emit(key, "end", stats)

    def _fail(self, key, err: LlmosdError, req: Request | None = None) -> None:
        req = self.reqs.pop(key, None) or req
        if req is not None:
            req.cache = None
        self.emit(key, "error", err.to_wire())

    def _drop(self, key) -> None:
        req = self.reqs.pop(key, None)
        if req is not None:
            req.cache = None
            self.emit(key, "error", Cancelled("the instance stopped").to_wire())
