"""Which sequences an engine step runs, and when a sequence is done.  Pure logic, no torch.

Continuous batching over a paged KV cache (``blocks.BlockManager``), vLLM v1 style: one step
runs every decoding sequence one token and spends what is left of one token budget
(``max_prefill_tokens``; each decode counts one) on prefill chunks, so a long prompt is cut
into chunks and never stalls the decodes.  Per step the engine calls ``schedule()``, runs the
``Plan`` (``Chunk`` rows of a prefill, ``decode`` keys), then ``postprocess()`` per sampled
token; ``finish()`` cancels.  ``num_computed`` of a sequence advances when it is scheduled:
the engine runs every plan it gets before it asks for the next one.

- Admission: a waiting sequence gets blocks for its whole prompt (leading blocks shared with a
  cached identical prefix count as computed; only between sequences of one adapter: a
  ``Seq``'s ``salt``) only when the pool holds them, and only while fewer than ``max_batch``
  running (prefilling + decoding) sequences are not blocked; a step decodes at most
  ``max_batch``.
- Fairness: preempted sequences come back first; then the waiting client with the fewest
  running sequences goes next (ties: the one served least recently), FIFO within a client, so
  one client's thousand queued lines get one slot per round and an interactive client's
  request goes next.
- Growth and preemption: a decoding sequence takes a new block when its table is full; when
  the pool is empty the newest running sequence is preempted (blocks freed, ``num_computed``
  0, back to the front of the queue) and later recomputed from its prompt and generated tokens
  (its computed blocks stay in the prefix cache until reused, so this is often cheap).
  ``capacity`` is cut to the pool at ``add``, so a sequence alone always fits and ends with
  "context" at the pool's size rather than deadlocking.
- Backpressure: a sequence whose client lags (``blocked(key)``) is skipped for the step and
  keeps its blocks, but holds no batch slot (a client that stops reading must not stall the
  others); when the pool is short, blocked sequences are preempted first (newest first), and
  come back (recomputed) once their client reads again.
- The wait queue is bounded: past ``max_waiting`` ``add`` raises ``Busy``.
"""
from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from llmctl.errors import Busy
from llmosd.serve.blocks import BlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass
class Seq:
    key: Hashable
    client: Hashable               # fairness unit (peer identity / uid)
    tokens: list[int]              # prompt + generated so far (postprocess appends)
    prompt_len: int
    max_tokens: int
    capacity: int                  # positions available: prompt + generated must fit
    num_computed: int = 0          # leading tokens whose KV is in the cache (or scheduled)
    generated: int = 0
    status: str = WAITING
    finish_reason: str | None = None
    arrival: int = 0               # set by add: a monotonic counter (newest preempted first)
    salt: bytes = b""              # blocks.adapter_salt of its adapter: KV shared only within one


@dataclass
class Chunk:
    """Prefill ``tokens[start:start + length]`` of ``key``; ``sample``: it ends at the end of
    the sequence's tokens, so the engine samples a token from its last row."""
    key: Hashable
    start: int
    length: int
    sample: bool


@dataclass
class Plan:
    prefill: list[Chunk] = field(default_factory=list)
    decode: list = field(default_factory=list)       # keys: compute tokens[-1], sample
    preempted: list = field(default_factory=list)    # keys whose KV was dropped this step
    finished: list = field(default_factory=list)     # keys the scheduler ended ("context")

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    """One instance's sequences over one ``BlockManager``.  One thread (the engine's)."""

    def __init__(self, blocks: BlockManager, *, max_batch: int = 16, max_prefill_tokens: int = 128,
                 max_waiting: int = 256, eos_ids=(), idle_prefill_tokens: int = 2048):
        """``idle_prefill_tokens``: the budget of a step with no sequence decoding (nobody's
        tokens to keep flowing, so a long prompt goes in big chunks: fewer, fuller matmuls)."""
        self.blocks = blocks
        self.max_batch = max(1, max_batch)
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.idle_prefill_tokens = max(self.max_prefill_tokens, idle_prefill_tokens)
        self.max_waiting = max(1, max_waiting)
        self.eos_ids = set(eos_ids)
        self.seqs: dict[Hashable, Seq] = {}
        self.running: dict[Hashable, None] = {}        # admitted keys, in admission order
        self._resume: deque = deque()                   # preempted keys: first to come back
        self._queues: dict[Hashable, deque] = {}        # client -> its waiting keys, FIFO
        self._running_of: Counter = Counter()           # client -> running sequences
        self._served: dict[Hashable, int] = {}          # client -> tick of its last admission
        self._tick = itertools.count()
        self._arrival = itertools.count()

    # -- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.seqs)

    def __contains__(self, key) -> bool:
        return key in self.seqs

    @property
    def waiting(self) -> int:
        return len(self.seqs) - len(self.running)

    def table(self, key) -> list[int]:
        return self.blocks.table(key)

    def stats(self) -> dict:
        b = self.blocks
        return {"waiting": self.waiting, "running": len(self.running),
                "blocks_total": b.num_blocks, "blocks_used": b.used_count,
                "blocks_cached": b.cached_count, "block_size": b.block_size}

    # -- requests -----------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        """Queue ``seq``.  ValueError when it could never run (empty prompt, prompt beyond its
        capacity or the whole pool: the engine reports InvalidArgument); Busy when
        ``max_waiting`` requests already wait.  Cuts ``seq.capacity`` to the pool's positions."""
        pool = self.blocks.num_blocks * self.blocks.block_size
        n = len(seq.tokens)
        if seq.key in self.seqs:
            raise ValueError(f"sequence {seq.key!r} is already scheduled")
        if n < 1:
            raise ValueError("the prompt has no tokens")
        if n > seq.capacity:
            raise ValueError(f"a prompt of {n} tokens does not fit the context of "
                             f"{seq.capacity} positions")
        if n > pool:
            raise ValueError(f"a prompt of {n} tokens does not fit the KV cache pool of "
                             f"{pool} positions ({self.blocks.num_blocks} blocks of "
                             f"{self.blocks.block_size})")
        if self.waiting >= self.max_waiting:
            raise Busy(f"the instance already has {self.waiting} requests waiting "
                       f"(max_waiting is {self.max_waiting})",
                       hint="retry later, or raise max_waiting (LLMOSD_MAX_WAITING) "
                            "for the daemon")
        seq.capacity = min(seq.capacity, pool)
        seq.status, seq.finish_reason, seq.num_computed = WAITING, None, 0
        seq.arrival = next(self._arrival)
        self.seqs[seq.key] = seq
        self._queues.setdefault(seq.client, deque()).append(seq.key)

    def postprocess(self, key, token: int, stop_hit: bool = False) -> Seq:
        """Record the token sampled for ``key`` (after its decode or last prefill chunk ran);
        returns its Seq, finished (blocks freed) with finish_reason "stop" (eos or a stop
        string), "length" (max_tokens) or "context" (capacity) when it ended."""
        seq = self.seqs[key]
        if key not in self.running or seq.num_computed != len(seq.tokens):
            raise ValueError(f"sequence {key!r} was not scheduled to sample a token")
        seq.tokens.append(token)
        seq.generated += 1
        if token in self.eos_ids or stop_hit:
            return self.finish(key, "stop")
        if seq.generated >= seq.max_tokens:
            return self.finish(key, "length")
        if len(seq.tokens) >= seq.capacity:
            return self.finish(key, "context")
        if self.blocks.positions(key) >= len(seq.tokens) or self.blocks.free_count:
            self.blocks.append(key, seq.tokens, seq.num_computed)
        else:                                          # the next schedule() makes room
            self.blocks.commit(key, seq.tokens, seq.num_computed)
        return seq

    def finish(self, key, reason: str) -> Seq | None:
        """End ``key`` (cancelled, failed, done): its blocks go back to the pool.  None when
        it is not here (already finished)."""
        seq = self.seqs.pop(key, None)
        if seq is None:
            return None
        if key in self.running:
            del self.running[key]
            self._running_of[seq.client] -= 1
            self.blocks.free(key)
        elif key in self._resume:
            self._resume.remove(key)
        else:
            q = self._queues[seq.client]
            q.remove(key)
            if not q:
                del self._queues[seq.client]
        if not self._running_of[seq.client]:
            del self._running_of[seq.client]
        if seq.client not in self._queues and seq.client not in self._running_of:
            self._served.pop(seq.client, None)
        seq.status, seq.finish_reason = FINISHED, reason
        return seq

    # -- the step ------------------------------------------------------------------------------
    def schedule(self, blocked: Callable[[Hashable], bool] = lambda key: False) -> Plan:
        """The next step's work: decodes first, then prefill chunks in the budget left."""
        plan = Plan()
        for key in self.running:       # the last plan ran: its full blocks join the prefix cache
            seq = self.seqs[key]
            self.blocks.commit(key, seq.tokens, seq.num_computed)
        # decodes count against the budget; prefills still progress, a token a step at least
        budget = max(1, self.max_prefill_tokens - self._decode(plan, blocked))
        if not plan.decode:
            budget = self.idle_prefill_tokens
        for key in sorted(self.running, key=lambda k: self.seqs[k].arrival):
            seq = self.seqs[key]
            if budget < 1:
                break
            if len(seq.tokens) - seq.num_computed > 1 and not blocked(key):
                budget -= self._chunk(plan, seq, budget)
        active = sum(1 for key in self.running if not blocked(key))
        while budget >= 1 and active < self.max_batch:
            key = self._next_waiting(blocked)
            if key is None or not self._room(plan, self.seqs[key], blocked):
                break
            budget -= self._chunk(plan, self._admit(key), budget)
            active += 1
        return plan

    def _room(self, plan: Plan, seq: Seq, blocked) -> bool:
        """Whether the pool can take waiting ``seq`` now, preempting blocked running sequences
        (newest first) while it cannot: they wait on their clients anyway."""
        while not self.blocks.can_allocate(seq.tokens, seq.salt):
            held = [k for k in self.running if blocked(k)]
            if not held:
                return False
            self._preempt(plan, max(held, key=lambda k: self.seqs[k].arrival))
        return True

    def _decode(self, plan: Plan, blocked) -> int:
        """Schedule the decodes (at most max_batch, round robin beyond); returns how many."""
        for key in list(self.running):
            if len(plan.decode) >= self.max_batch:
                break
            seq = self.seqs.get(key)
            if (key not in self.running or len(seq.tokens) - seq.num_computed != 1
                    or blocked(key) or not self._grow(plan, seq, blocked)):
                continue
            plan.decode.append(key)
            seq.num_computed += 1
        if len(plan.decode) >= self.max_batch:        # more than fit: they go last next step
            for key in plan.decode:
                self.running[key] = self.running.pop(key)
        return len(plan.decode)

    def _grow(self, plan: Plan, seq: Seq, blocked) -> bool:
        """Make ``seq``'s table cover all its tokens, preempting while the pool is empty: the
        newest blocked running sequence, else the newest running one; False when ``seq``
        itself was preempted or ended."""
        need = len(seq.tokens)
        while self.blocks.positions(seq.key) < need and not self.blocks.free_count:
            victim = max(self.running, key=lambda k: (bool(blocked(k)), self.seqs[k].arrival))
            if victim == seq.key and len(self.running) == 1:
                self.finish(seq.key, "context")      # unreachable: capacity is cut to the pool
                plan.finished.append(seq.key)
                return False
            self._preempt(plan, victim)
            if victim == seq.key:
                return False
        if self.blocks.positions(seq.key) < need:
            self.blocks.append(seq.key, seq.tokens, seq.num_computed)
        return True

    def _preempt(self, plan: Plan, key) -> None:
        seq = self.seqs[key]
        if key in plan.decode:
            plan.decode.remove(key)
        del self.running[key]
        self._running_of[seq.client] -= 1
        self.blocks.free(key)
        seq.num_computed, seq.status = 0, WAITING
        self._resume.appendleft(key)
        plan.preempted.append(key)

    def _next_waiting(self, blocked):
        """The key to admit next: a preempted one, else the fair pick's FIFO head; None."""
        for key in self._resume:
            if not blocked(key):
                return key
        best = None
        for client, q in self._queues.items():
            if blocked(q[0]):
                continue
            rank = (self._running_of.get(client, 0), self._served.get(client, -1))
            if best is None or rank < best[0]:
                best = (rank, q[0])
        return None if best is None else best[1]

    def _admit(self, key) -> Seq:
        seq = self.seqs[key]
        if key in self._resume:
            self._resume.remove(key)
        else:
            q = self._queues[seq.client]
            q.popleft()
            if not q:
                del self._queues[seq.client]
        seq.num_computed = self.blocks.allocate(key, seq.tokens, seq.salt)
        seq.status = RUNNING
        self.running[key] = None
        self._running_of[seq.client] += 1
        self._served[seq.client] = next(self._tick)
        return seq

    def _chunk(self, plan: Plan, seq: Seq, budget: int) -> int:
        """Schedule the next prefill chunk of ``seq`` within ``budget``; returns its length."""
        n = min(len(seq.tokens) - seq.num_computed, budget)
        end = seq.num_computed + n
        plan.prefill.append(Chunk(seq.key, seq.num_computed, n, end == len(seq.tokens)))
        seq.num_computed = end
        return n
