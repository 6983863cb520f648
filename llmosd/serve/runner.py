"""The torch half of an engine: batched forward passes over the paged KV pool, next-token
choice, one-shot evaluations cut into slices, and the release of the model's memory.
``engine.py`` is the loop around it.

Contract: every method runs on the engine's own thread (inside ``session()``), and every failure
leaves as an ``LlmosdError`` (``OutOfMemory``, ``Cancelled``, ``InvalidArgument``, ``Internal``),
so the loop needs to know nothing of torch's exceptions.

Paged serving (issue 13): the runner owns the instance's KV pool (``PagedKV``: ``num_blocks``
blocks of ``block_size`` positions, plus one scratch block of its own for padding rows).  The
engine's block manager hands out block ids; ``run(work)`` takes one step's ``SeqWork``s
(prefill chunks at any start, decodes) and runs them in one forward per adapter group: the
linear layers see every row, each sequence attends to its own blocks.  On CUDA with
``compile`` not "off", decode batches are padded to ``BUCKETS`` and replayed from CUDA graphs
(captured lazily per (batch, length) bucket; any capture error falls back to eager for good).
On the CPU nothing is padded.  Float32 greedy output is the same batched as alone.

Adapters: ``install`` puts an adapter's LoRA tensors into the model (``lora.add_adapter``, sharing
the base's weights) and its classification head on the device; before each forward pass and
call slice the request's adapter is made the active one (``lora.set_active``), so requests with
different adapters, or none (exactly the base), take turns on one copy of the base weights.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Hashable

import torch

from llmctl.errors import Cancelled, Internal, InvalidArgument, LlmosdError, LoadFailed, OutOfMemory
import llmosd.serve.evaluate as evaluate
from llmosd.models import cstep, lora, qkernels, quant
from llmosd.models.llama import KVCache, Llama, PagedKV, paged_batch
from llmosd.models.loader import release_free_heap, resident_bytes
from llmosd.serve.request import GREEDY_BELOW, Call, SamplingParams, invalid_argument
from llmosd.serve.sampling import make_generator, sample, top_logprobs

log = logging.getLogger("llmosd.engine")

BUCKETS = (1, 2, 4, 8, 16, 32)     # decode batch sizes a CUDA graph is captured for


def kv_position_bytes(layers: int, kv_heads: int, head_dim: int, dtype_size: int) -> int:
    """Bytes one position of a sequence takes in the KV cache: a key and a value per layer."""
    return layers * 2 * kv_heads * head_dim * dtype_size


@dataclass
class SeqWork:
    """One sequence's share of a step: ``ids`` (the new tokens) at positions ``start`` ..
    ``start + len(ids) - 1``, whose K/V go into the blocks of ``block_table`` (which must cover
    ``start + len(ids)`` positions; the positions before ``start`` are already there).
    ``sample``: choose the next token after the last id (a decode, or a prefill's last chunk).
    ``history``: prompt and output ids so far, for the repetition penalty."""
    key: Hashable
    ids: list
    start: int
    block_table: list
    sample: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    history: list = field(default_factory=list)
    logprobs: int = 0
    adapter: str | None = None


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
    """A loaded model on its device with its paged KV pool."""

    def __init__(self, model: Llama, tokenizer, device: torch.device, *, num_blocks: int = 0,
                 block_size: int = 16, compile: str = "off"):
        """``num_blocks`` blocks of ``block_size`` positions are allocated for ``run`` (0: no
        pool, only the per-sequence ``new_cache``/``step`` path); OutOfMemory if they do not
        fit.  ``compile``: the config's key; not "off" enables CUDA graphs on CUDA."""
        self.model, self.tok, self.device = model, tokenizer, device
        self.adapters: dict = {}       # key -> Installed; None: a merged classifier's own head
        self._active = None            # the adapter key whose LoRA weights the model applies
        c = model.config
        self.context = c.max_position_embeddings
        # the norms stay in the activations' dtype whatever replaces the linears (quantized)
        self.kv_dtype = model.model.norm.weight.dtype
        self.kv_position_bytes = kv_position_bytes(c.num_hidden_layers, c.num_key_value_heads,
                                                   c.head_dim, self.kv_dtype.itemsize)
        self.eos_ids = c.eos_ids() | tokenizer.eos_ids()
        if block_size < 1 or num_blocks < 0:
            raise ValueError("block_size must be >= 1 and num_blocks >= 0")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.block_bytes = block_size * self.kv_position_bytes
        self.kv: PagedKV | None = None
        self.graphs_enabled = device.type == "cuda" and compile != "off"
        self.fused = device.type == "cpu" and compile != "off"      # the C decode step
        self._cstep = None             # its plan; False: this model cannot take it
        self._graphs: dict = {}        # (batch, length) -> _DecodeGraph
        self._graph_pool = None
        if num_blocks:
            self._alloc_pool()

    @property
    def pool_bytes(self) -> int:
        """Device bytes of the KV pool (its blocks and the scratch block), 0 without one."""
        return (self.num_blocks + 1) * self.block_bytes if self.num_blocks else 0

    def _alloc_pool(self) -> None:
        try:       # one block more than handed out: the scratch block padding rows write to
            self.kv = PagedKV(self.model.config, self.num_blocks + 1, self.block_size,
                              self.device, self.kv_dtype)
        except torch.OutOfMemoryError:
            self.kv = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise OutOfMemory(f"no memory for the KV cache pool ({self.num_blocks} blocks, "
                              f"{self.pool_bytes:,} bytes) on {self.device}",
                              hint="lower max_kv_bytes, or free memory on the device") from None

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
        self._drop_graphs()
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
        self._drop_graphs()
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

    # -- paged, batched steps ------------------------------------------------------------------
    def run(self, work: list[SeqWork]) -> list:
        """One step: every ``SeqWork``'s ids through the model over the paged pool, grouped by
        adapter (one forward per group), then a token chosen for each that samples.  Returns,
        in ``work``'s order, a ``Sampled``, None (``sample`` false) or a ``Cancelled`` error
        (that sequence's adapter is gone: nothing of it ran).  Raises OutOfMemory / Internal
        when the step as a whole failed."""
        if self.kv is None:
            raise Internal("this runner has no KV pool (built with num_blocks=0)")
        out: list = [None] * len(work)
        groups: dict = {}
        for i, w in enumerate(work):
            if w.adapter is not None and w.adapter not in self.adapters:
                out[i] = Cancelled("the request's adapter was unloaded")
            else:
                groups.setdefault(w.adapter, []).append(i)
        try:
            for adapter, idx in groups.items():
                self.activate(adapter)
                for i, got in zip(idx, self._run_group([work[i] for i in idx], adapter is None)):
                    out[i] = got
        except torch.OutOfMemoryError:
            raise OutOfMemory("ran out of memory while generating") from None
        except LlmosdError:
            raise
        except Exception as e:
            log.exception("forward pass failed")
            raise Internal(f"forward pass failed: {e}") from None
        return out

    def _check(self, w: SeqWork) -> None:
        end = w.start + len(w.ids)
        if not w.ids or w.start < 0 or end > self.context or end > len(w.block_table) * self.block_size:
            raise Internal(f"bad step for {w.key!r}: {len(w.ids)} ids at {w.start}, "
                           f"{len(w.block_table)} blocks of {self.block_size}, context {self.context}")

    def _run_group(self, ws: list[SeqWork], base: bool) -> list:
        """Forward and sample one adapter group; results in ``ws``'s order."""
        for w in ws:
            self._check(w)
        sampled = [i for i, w in enumerate(ws) if w.sample]
        dec = [i for i, w in enumerate(ws) if len(w.ids) == 1]
        logits: dict[int, torch.Tensor] = {}      # index in ws -> (V,) float32
        rows = None                               # (>= len(dec), V): the decodes' logits
        if base and dec:              # decodes in one fused call: a CUDA graph, or C on the CPU
            if self.graphs_enabled:
                graph = self._graph_for([ws[i] for i in dec])
                if graph is not None:
                    rows = graph.replay([(ws[i].ids, ws[i].start, ws[i].block_table) for i in dec])
            elif (plan := self._cplan()) is not None:
                rows = plan.run([ws[i].ids[0] for i in dec], [ws[i].start for i in dec],
                                [ws[i].block_table for i in dec])
        if rows is not None:
            for r, i in enumerate(dec):
                logits[i] = rows[r]
            single = set(dec)
            eager = [i for i in range(len(ws)) if i not in single]
        else:
            eager = list(range(len(ws)))
        if eager:
            pb, last = paged_batch([(ws[i].ids, ws[i].start, ws[i].block_table) for i in eager],
                                   self.block_size, self.device, scratch=self.num_blocks)
            want = [j for j, i in enumerate(eager) if ws[i].sample]
            if want:
                rows = torch.tensor([last[j] for j in want], device=self.device)
                got = self.model.forward_paged(pb, self.kv, rows)           # (R, V) float32
                for r, j in enumerate(want):
                    logits[eager[j]] = got[r]
            else:
                self.model.hidden_paged(pb, self.kv)                        # K/V written only
        return self._choose(ws, sampled, logits)

    def _choose(self, ws: list[SeqWork], sampled: list[int], logits: dict) -> list:
        """A token per sampling row: plain greedy rows in one argmax, the rest one by one."""
        out: list = [None] * len(ws)
        plain = [i for i in sampled if ws[i].sampling.temperature < GREEDY_BELOW and not ws[i].logprobs
                 and ws[i].sampling.repetition_penalty == 1.0]
        if plain:
            for i, t in zip(plain, torch.stack([logits[i] for i in plain]).argmax(-1).tolist()):
                out[i] = Sampled(t)
        for i in sampled:
            if out[i] is None:
                out[i] = self._sample(logits[i], ws[i])
        return out

    def _sample(self, logits: torch.Tensor, w: SeqWork) -> Sampled:
        seen = (torch.tensor(w.history, device=self.device, dtype=torch.long)
                if w.sampling.repetition_penalty != 1.0 else None)
        token = sample(logits, w.sampling, w.generator, seen)
        if not w.logprobs:
            return Sampled(token)
        lp, top = top_logprobs(logits, token, w.logprobs)
        return Sampled(token, lp, top)

    # -- CUDA graphs of decode steps ------------------------------------------------------------
    def _graph_for(self, dec: list[SeqWork]):
        """The captured graph for this decode batch's bucket, or None (eager): past the
        largest bucket, or after a capture failed once."""
        n = len(dec)
        B = next((b for b in BUCKETS if b >= n), None)
        if B is None:
            return None
        blocks = max(-(-(w.start + 1) // self.block_size) for w in dec)
        most = -(-self.context // self.block_size)
        S = min(1 << (blocks - 1).bit_length(), most) * self.block_size
        key = (B, S)
        if key not in self._graphs:
            try:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                self._graphs[key] = _DecodeGraph(self, B, S)
            except Exception as e:           # e.g. a kernel that cannot be captured
                log.warning("CUDA graph capture failed (%s): decoding eagerly", e)
                self.graphs_enabled = False
                self._graphs.clear()
                return None
        return self._graphs[key]

    def _cplan(self):
        """The C decode step's plan (``cstep``) for this model and pool on the CPU, or None
        where it does not apply (decodes then run eagerly)."""
        if self._cstep is None or (self._cstep and self._cstep.kv is not self.kv):
            self._cstep = (self._fused_plan() if self.fused else None) or False
        return self._cstep or None

    def _fused_plan(self):
        if quant.KERNELS.wanted == "off":
            return None
        ck = qkernels.load(quant.quantize, quant.dequantize)
        plan = cstep.Plan.build(ck.lib, self.model, self.kv) if ck is not None else None
        log.info("decode step: %s", "fused C" if plan is not None else "eager torch")
        return plan

    def _drop_graphs(self) -> None:
        """The captured graphs and the C step's plan hold the weights' and the pool's
        addresses: drop them when either moves or the model's modules change."""
        self._graphs.clear()
        self._graph_pool = None
        self._cstep = None

    # -- calls ----------------------------------------------------------------------------------
    def start_call(self, call: Call, slice_tokens: int | None = None) -> "CallTask":
        """``call`` as a task run a slice at a time (each slice one forward of at most
        ``slice_tokens`` tokens; None: a window or input per slice).  InvalidArgument now if
        a ``classify_head`` has no head."""
        extra = {}
        if call.name == "classify_head":
            got = self.adapters.get(call.adapter)
            if got is None or got.head is None:
                raise InvalidArgument("this model has no classification head: give --labels")
            extra = {"head": got.head, "trained": got.labels or []}
        if call.name not in evaluate.STEPS:
            raise InvalidArgument(f"unknown call {call.name!r}")
        gen = evaluate.STEPS[call.name](self.model, self.tok, self.device, slice_tokens=slice_tokens,
                                        **call.args, **extra)
        return CallTask(self, call, gen)

    def call(self, call: Call, should_stop) -> dict:
        """Run ``call`` to its end (``start_call`` with a window or input per slice);
        ``should_stop()`` true between slices abandons it (Cancelled)."""
        task = self.start_call(call)
        while not task.done:
            if should_stop():
                raise Cancelled(f"the instance stopped during {call.name}")
            task.step()
        return task.result

    # -- the host tier (issue 12) ---------------------------------------------------------------
    def offload(self) -> None:
        """Swap out: the model (with its installed adapters and heads) leaves the device for
        host RAM, pinned on CUDA so the swap-in copies fast; on the CPU it stays as it is.
        Engine thread (as it ends) only."""
        if self.device.type == "cpu":
            return
        self._drop_graphs()
        self.kv = None                 # the sequences are gone with the engine: nothing to keep
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
            if self.num_blocks and self.kv is None:
                self._alloc_pool()
        except (torch.OutOfMemoryError, OutOfMemory):
            self.kv = None
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
        self._drop_graphs()
        self.model = None
        self.kv = None
        self.adapters.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        release_free_heap()


class CallTask:
    """A call in progress: each ``step()`` runs one slice (one forward pass) with the call's
    adapter active and returns the tokens it took; once ``done``, ``result`` is the reply
    (the dict ``evaluate`` returns).  A failure leaves ``step`` as an LlmosdError (the task is
    then done, ``error`` set)."""

    def __init__(self, runner: Runner, call: Call, gen):
        self.runner, self.call, self._gen = runner, call, gen
        self.done, self.result, self.error = False, None, None

    def step(self) -> int:
        if self.done:
            return 0
        name = self.call.name
        try:
            self.runner.activate(self.call.adapter)
            with quant.float32_gemms():         # evaluations: the float32 path's figures
                return next(self._gen)
        except StopIteration as e:
            self.done, self.result = True, e.value
            return 0
        except ValueError as e:
            err = invalid_argument(e)
        except torch.OutOfMemoryError:
            err = OutOfMemory(f"ran out of memory during {name}")
        except LlmosdError as e:
            err = e
        except Exception as e:
            log.exception("%s failed", name)
            err = Internal(f"{name} failed: {e}")
        self.done, self.error, self._gen = True, err, None
        raise err

    def close(self) -> None:
        """Abandon it (its buffers go now)."""
        self.done, self._gen = True, None


class _DecodeGraph:
    """One decode step captured as a CUDA graph: B rows (the bucket, padded with rows on the
    scratch block) gathering S positions each.  Its inputs are static device tensors that
    ``replay`` overwrites; its logits (B, V) are overwritten by the next replay."""

    def __init__(self, runner: Runner, B: int, S: int):
        self.B, self.S, self.r = B, S, runner
        pb, _ = self._batch([])
        self.pb = pb
        self.static = [pb.tokens, pb.positions, pb.slots, pb.groups[0].gather, pb.groups[0].mask]
        self.static = [t.to(runner.device) for t in self.static]
        pb.tokens, pb.positions, pb.slots = self.static[:3]
        pb.groups[0].gather, pb.groups[0].mask = self.static[3:]
        model, kv = runner.model, runner.kv
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):           # warm-up: lazy inits happen outside the capture
            for _ in range(2):
                model.forward_paged(pb, kv)
        torch.cuda.current_stream(runner.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner._graph_pool):
            self.out = model.forward_paged(pb, kv)                       # (B, V) float32

    def _batch(self, seqs):
        return paged_batch(seqs, self.r.block_size, "cpu", pad_batch=self.B, pad_len=self.S,
                           scratch=self.r.num_blocks, force_mask=True)

    def replay(self, seqs: list) -> torch.Tensor:
        """seqs [(ids, start, table)] single-token rows, at most B, none past S -> (B, V)."""
        pb, _ = self._batch(seqs)
        g = pb.groups[0]
        for dst, src in zip(self.static, (pb.tokens, pb.positions, pb.slots, g.gather, g.mask)):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.out

