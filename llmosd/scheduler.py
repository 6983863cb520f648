"""Which sequences an engine step runs, and when a sequence is done.  Pure logic, no torch.

``schedule()`` returns a ``Plan`` (sequences to prefill, sequences to decode one token); the
engine runs it; ``update()`` takes each sampled token and says whether its sequence finished.
Sequences whose client has not taken its output (``blocked``) are skipped, which is how a slow
reader applies backpressure without stalling the other sequences.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass
class Seq:
    key: Hashable
    prompt_len: int
    max_tokens: int
    capacity: int                  # positions available (prompt + generated must fit)
    generated: int = 0
    status: str = WAITING
    finish_reason: str | None = None


@dataclass
class Plan:
    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_batch: int, eos_ids: set[int]):
        self.max_batch = max(1, max_batch)
        self.eos_ids = set(eos_ids)
        self.seqs: dict[Hashable, Seq] = {}
        self._order: deque = deque()       # round-robin order of unfinished keys

    def add(self, seq: Seq) -> None:
        if seq.prompt_len < 1 or seq.prompt_len > seq.capacity:
            raise ValueError(f"prompt of {seq.prompt_len} tokens does not fit {seq.capacity} positions")
        self.seqs[seq.key] = seq
        self._order.append(seq.key)

    def finish(self, key: Hashable, reason: str) -> Seq | None:
        seq = self.seqs.pop(key, None)
        if seq is not None:
            seq.status, seq.finish_reason = FINISHED, reason
            self._order.remove(key)
        return seq

    def __len__(self) -> int:
        return len(self.seqs)

    def schedule(self, blocked: Callable[[Hashable], bool] = lambda k: False) -> Plan:
        """Up to max_batch runnable sequences, oldest waiting prefills first, then round robin."""
        plan = Plan()
        chosen = 0
        for key in list(self._order):
            if chosen >= self.max_batch:
                break
            seq = self.seqs[key]
            if blocked(key):
                continue
            (plan.prefill if seq.status == WAITING else plan.decode).append(key)
            chosen += 1
        # rotate so that sequences beyond max_batch get their turn next step
        if len(self._order) > self.max_batch:
            self._order.rotate(-chosen)
        return plan

    def update(self, key: Hashable, token: int, stop_hit: bool = False) -> Seq:
        """Record one sampled token; returns the Seq, finished (and removed) if it ended."""
        seq = self.seqs[key]
        seq.status = RUNNING
        seq.generated += 1
        if token in self.eos_ids or stop_hit:
            return self.finish(key, "stop")
        if seq.generated >= seq.max_tokens:
            return self.finish(key, "length")
        if seq.prompt_len + seq.generated >= seq.capacity:
            return self.finish(key, "context")
        return seq
