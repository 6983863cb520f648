"""The torch half of an engine: a sequence's forward pass and next-token choice, one-shot
evaluations, and the release of the model's memory.  ``engine.py`` is the loop around it.

Contract: every method runs on the engine's own thread (inside ``session()``), and every failure
leaves as an ``LlmosdError`` (``OutOfMemory``, ``Cancelled``, ``InvalidArgument``, ``Internal``),
so the loop needs to know nothing of torch's exceptions.  A sequence runs alone (batch 1), so
its output is bit-identical to a plain forward pass of the same weights.

Adapters: ``install`` puts an adapter's LoRA tensors into the model (``lora.add_adapter``, sharing
the base's weights) and its classification head on the device; before each forward pass and
call the request's adapter is made the active one (``lora.set_active``), so requests with
different adapters, or none (exactly the base), take turns on one copy of the base weights.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from dataclasses import dataclass, field

import torch

from llmctl.errors import Cancelled, Internal, InvalidArgument, LlmosdError, LoadFailed, OutOfMemory
import llmosd.serve.evaluate as evaluate
from llmosd.models import lora
from llmosd.models.llama import KVCache, Llama
from llmosd.models.loader import resident_bytes
from llmosd.serve.request import Call, SamplingParams, invalid_argument
from llmosd.serve.sampling import make_generator, sample, top_logprobs
from llmosd.serve.scheduler import kv_position_bytes

log = logging.getLogger("llmosd.engine")


@dataclass
class Sampled:
    """One step's result: the chosen token, and with logprobs its log-probability under the
    model and the most likely alternatives as (id, logprob)."""
    token: int
    logprob: float = 0.0
    top: list = field(default_factory=list)


@dataclass
class Installed:
    """What the runner keeps of an installed adapter: whether it has LoRA weights in the
    model, and a classifier's head (on the device) and labels."""
    lora: bool
    head: torch.Tensor | None = None
    labels: list | None = None


class Runner:
    """A loaded model on its device, run one sequence at a time."""

    def __init__(self, model: Llama, tokenizer, device: torch.device):
        self.model, self.tok, self.device = model, tokenizer, device
        self.adapters: dict = {}       # key -> Installed; None: a merged classifier's own head
        self._active = None            # the adapter key whose LoRA weights the model applies
        c = model.config
        self.context = c.max_position_embeddings
        self.kv_dtype = model.model.embed_tokens.weight.dtype
        self.kv_position_bytes = kv_position_bytes(c.num_hidden_layers, c.num_key_value_heads,
                                                   c.head_dim, self.kv_dtype.itemsize)
        self.eos_ids = c.eos_ids() | tokenizer.eos_ids()

    def session(self):
        """The context the engine thread runs in: no autograd state is kept."""
        return torch.inference_mode()

    def new_cache(self, positions: int) -> KVCache:
        """A KV cache for ``positions`` positions: (layers) x (1, kv_heads, positions, head_dim)."""
        try:
            return KVCache(self.model.config, positions, device=self.device, dtype=self.kv_dtype)
        except torch.OutOfMemoryError:
            raise OutOfMemory("no memory for this request's KV cache") from None

    # -- adapters ------------------------------------------------------------------------------
    def install(self, key, adapter) -> int:
        """Install ``adapter`` (a ``lora.Adapter``) under ``key``; returns the bytes it added
        on the device (its LoRA tensors in the model, and its head).  ``key`` None: the
        model's own head (a merged classifier), used by requests without an adapter.  A
        failure leaves nothing of the adapter behind (its name stays free to try again)."""
        before = resident_bytes(self.model)
        has_lora = key is not None and adapter.lora is not None
        try:
            if has_lora:
                lora.add_adapter(self.model, key, adapter.lora, adapter.tensors, device=self.device)
            head = None
            if adapter.head is not None:
                head = adapter.head.to(self.device)
        except Exception as e:
            if has_lora and key not in self.adapters:
                self._undo(key)
            if isinstance(e, torch.OutOfMemoryError):
                raise OutOfMemory("not enough memory to install the adapter") from None
            if isinstance(e, ValueError):
                raise LoadFailed(f"the adapter does not fit its base: {e}") from None
            log.exception("installing an adapter failed")
            raise LoadFailed(f"installing the adapter failed: {e}") from None
        self.adapters[key] = Installed(has_lora, head, list(adapter.labels) if adapter.labels else None)
        head_bytes = head.untyped_storage().nbytes() if head is not None else 0
        return resident_bytes(self.model) - before + head_bytes

    def _undo(self, key) -> None:
        """After a failed install: take out whatever the model holds of ``key`` (add_adapter
        is atomic, but the head's copy may have failed after it)."""
        try:
            lora.uninstall(self.model, key)
        except Exception:
            log.exception("removing a failed adapter's LoRA weights failed")

    def uninstall(self, key) -> None:
        """Take the adapter ``key`` out (unknown keys: nothing to do)."""
        got = self.adapters.pop(key, None)
        if got is None or not got.lora:
            return
        if self._active == key:
            lora.set_active(self.model, None)
            self._active = None
        lora.uninstall(self.model, key)

    def activate(self, key) -> None:
        """Make ``key``'s LoRA weights the ones the next forward pass applies (None, or an
        adapter without LoRA weights: the base alone).  Cancelled if it is not installed
        (detached while the request waited)."""
        if key is not None and key not in self.adapters:
            raise Cancelled("the request's adapter was unloaded")
        want = key if key is not None and self.adapters[key].lora else None
        if want != self._active:
            lora.set_active(self.model, want)
            self._active = want

    @staticmethod
    def new_generator(seed: int | None) -> torch.Generator:
        return make_generator(seed)

    def step(self, cache: KVCache, ids: list[int], pos: int, sampling: SamplingParams,
             generator: torch.Generator, history: list[int], logprobs: int = 0,
             adapter=None) -> Sampled:
        """Feed ``ids`` (the whole prompt at ``pos`` 0 for a prefill, the last token for a
        decode) into ``cache`` and choose the next token, with ``adapter``'s weights active.
        ``history``: prompt and output ids so far, for the repetition penalty."""
        self.activate(adapter)
        try:
            x = torch.tensor([ids], device=self.device)                    # (1, T)
            logits = self.model(x, cache, pos, last_only=True)[0, -1]      # (V,) float32
            seen = (torch.tensor(history, device=self.device)
                    if sampling.repetition_penalty != 1.0 else None)
            token = sample(logits, sampling, generator, seen)
            if not logprobs:
                return Sampled(token)
            lp, top = top_logprobs(logits, token, logprobs)
            return Sampled(token, lp, top)
        except torch.OutOfMemoryError:
            raise OutOfMemory("ran out of memory while generating") from None
        except Exception as e:
            log.exception("forward pass failed")
            raise Internal(f"forward pass failed: {e}") from None

    def call(self, call: Call, should_stop) -> dict:
        """Run ``evaluate.<call.name>`` with the call's adapter active (``classify_head`` gets
        the installed head and labels); ``should_stop()`` true abandons it (Cancelled)."""
        self.activate(call.adapter)
        extra = {}
        if call.name == "classify_head":
            got = self.adapters.get(call.adapter)
            if got is None or got.head is None:
                raise InvalidArgument("this model has no classification head: give --labels")
            extra = {"head": got.head, "trained": got.labels or []}
        try:
            return evaluate.FUNCTIONS[call.name](self.model, self.tok, self.device,
                                                 should_stop=should_stop, **call.args, **extra)
        except evaluate.Stopped:
            raise Cancelled(f"the instance stopped during {call.name}") from None
        except ValueError as e:
            raise invalid_argument(e) from None
        except torch.OutOfMemoryError:
            raise OutOfMemory(f"ran out of memory during {call.name}") from None
        except LlmosdError:
            raise
        except Exception as e:
            log.exception("%s failed", call.name)
            raise Internal(f"{call.name} failed: {e}") from None

    # -- the host tier (issue 12) ---------------------------------------------------------------
    def offload(self) -> None:
        """Swap out: the model (with its installed adapters and heads) leaves the device for
        host RAM, pinned on CUDA so the swap-in copies fast; on the CPU it stays as it is.
        Engine thread (as it ends) only."""
        if self.device.type == "cpu":
            return
        self._move(torch.device("cpu"), pin=True)
        gc.collect()
        torch.cuda.empty_cache()

    def onload(self) -> None:
        """Swap in: the model back onto ``self.device`` (a no-op on the CPU).  OutOfMemory if
        the device has no room (the model is left on the host).  Loader thread only."""
        if self.device.type == "cpu":
            return
        try:
            self._move(self.device, pin=False)
        except torch.OutOfMemoryError:
            self._move(torch.device("cpu"), pin=True)
            gc.collect()
            torch.cuda.empty_cache()
            raise OutOfMemory(f"not enough memory on {self.device} to swap the model back in") from None

    def _move(self, device: torch.device, pin: bool) -> None:
        """Every tensor of the model (each storage once: tied weights stay tied) and every
        installed head to ``device``."""
        seen = set()
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            data = t.data.to(device, non_blocking=not pin)
            t.data = data.pin_memory() if pin and torch.cuda.is_available() else data
        for got in self.adapters.values():
            if got.head is not None:
                got.head = got.head.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def close(self) -> None:
        """Drop the model and give its memory back (on the engine thread, never the loop's):
        a collection frees the tensors now, and on CUDA the caching allocator's blocks return
        to the device for the next load."""
        self.model = None
        self.adapters.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        release_heap()


def _libc():
    """glibc, if this process runs on it (None elsewhere: musl, macOS)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def release_heap() -> None:
    """Give the heap's free pages back to the system (glibc keeps freed memory for the
    process, so its RSS would stay at its peak after an unload); nothing elsewhere."""
    if _LIBC is not None:
        try:
            _LIBC.malloc_trim(0)
        except Exception:          # never fatal: it only returns memory early
            log.debug("malloc_trim failed", exc_info=True)
