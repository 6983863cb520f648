"""Which sequences an engine step runs, when a sequence is done, and which requests are admitted
at all.  Pure logic, no torch.

``schedule()`` returns a ``Plan`` (sequences to prefill, sequences to decode one token); the
engine runs it; ``update()`` takes each sampled token and says whether its sequence finished.
Sequences whose client has not taken its output (``blocked``) are skipped, which is how a slow
reader applies backpressure without stalling the other sequences.

Admission (``KVBudget``): each generation holds a KV cache for its whole length from its first
step, so the daemon admits generations against a limit of KV-cache bytes (``max_kv_bytes``)
instead of letting them grow until the OOM killer ends the daemon.  The instance manager owns
one budget and uses it on the control-loop thread only (no lock, no state shared with engines):
- at submit it reserves an upper bound, ``kv_request_bytes``: the prompt's token count is
  bounded from its UTF-8 length without tokenizing (``prompt_token_bound``), plus max_tokens,
  capped by the context; a request past the free bytes gets ``Busy``, one bigger than the
  whole limit ``InvalidArgument`` (it could never run);
- the engine never allocates more than was reserved, and once it has tokenized it reports the
  bytes really allocated, which shrink the reservation;
- the reservation is released when the request ends, fails or is cancelled, or its instance
  stops.
score/embed/classify hold no KV cache and are not counted.  (The memory manager will replace
this with budgets per device; the paged engine with blocks handed out as sequences grow.)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from llmctl.errors import Busy, InvalidArgument
# Decimal units, as llmctl's tables write them; serve/instances.py imports size_text from here.
from llmosd.mem.policy import size_text, sizes_text  # noqa: F401

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


# -- admission by KV-cache bytes ---------------------------------------------------------------

PROMPT_MARGIN = 16           # tokens beyond one per UTF-8 byte: BOS, SentencePiece's "▁" prefix
CHAT_MESSAGE_MARGIN = 16     # per chat message: role markers and separators the template writes
CHAT_TEMPLATE_MARGIN = 512   # per chat: a template's preamble (default system prompt, date, ...)


def kv_position_bytes(layers: int, kv_heads: int, head_dim: int, dtype_size: int) -> int:
    """Bytes one position of a sequence takes in the KV cache: a key and a value per layer."""
    return layers * 2 * kv_heads * head_dim * dtype_size


def prompt_token_bound(prompt: str, messages: list | None = None) -> int:
    """An upper bound of a prompt's tokens, without the tokenizer: byte-level BPE and
    byte-fallback SentencePiece tokens each cover at least one UTF-8 byte of the text, so the
    count is at most the bytes plus the few tokens the tokenizer or chat template adds.
    (A Unicode normalizer can expand text beyond this; the engine then cuts the output at the
    reserved length.)"""
    if messages is None:
        return len(prompt.encode("utf-8", "surrogatepass")) + PROMPT_MARGIN
    text = sum(len(str(m.get("role", "")).encode("utf-8", "surrogatepass"))
               + len(str(m.get("content", "")).encode("utf-8", "surrogatepass")) for m in messages)
    return text + CHAT_MESSAGE_MARGIN * len(messages) + CHAT_TEMPLATE_MARGIN + PROMPT_MARGIN


def kv_positions(context: int, prompt_bound: int, max_tokens: int) -> int:
    """Positions to reserve: the prompt and every token it may generate, at most the context."""
    return max(1, min(context, prompt_bound + max_tokens))


class KVBudget:
    """KV-cache bytes reserved by admitted requests against ``limit``.  One thread only."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the KV-cache limit must be positive, got {limit}")
        self.limit = limit
        self.held: dict[Hashable, tuple[Hashable, int]] = {}    # key -> (owner, bytes)

    @property
    def used(self) -> int:
        return sum(b for _, b in self.held.values())

    @property
    def free(self) -> int:
        return self.limit - self.used

    def admit(self, key: Hashable, owner: Hashable, need: int, position_bytes: int = 0,
              prompt_bound: int = 0, budget_free: tuple[str, int] | None = None) -> None:
        """Reserve ``need`` bytes for ``key`` (its instance ``owner``), or raise: Busy when the
        free bytes do not hold it now, InvalidArgument when the whole limit never could.
        ``budget_free``: (device, bytes) its memory budget has free (issue 12: the KV cache
        is charged against it like the models): Busy past that too."""
        if need > self.limit:
            fit = self.limit // position_bytes - prompt_bound if position_bytes else 0
            most = f"; with this prompt, max_tokens up to {fit:,} fits" if fit > 0 else ""
            need_t, limit_t = sizes_text(need, self.limit)
            raise InvalidArgument(
                f"this request needs {need_t} of KV cache, more than the daemon's whole "
                f"limit of {limit_t}{most}",
                hint="lower max_tokens (or shorten the prompt), or raise max_kv_bytes "
                     "(LLMOSD_MAX_KV_BYTES) for the daemon")
        free = self.free
        if need > free:
            need_t, free_t, limit_t = sizes_text(need, max(free, 0), self.limit)
            raise Busy(f"not enough KV-cache memory for this request now: it needs {need_t}, "
                       f"{free_t} of the {limit_t} limit is free "
                       f"({len(self.held)} request(s) hold the rest)",
                       hint="lower max_tokens, or retry when running requests have finished")
        if budget_free is not None and need > budget_free[1]:
            device, left = budget_free
            need_t, left_t = sizes_text(need, max(left, 0))
            raise Busy(f"not enough memory for this request's KV cache now: it needs {need_t}, "
                       f"the memory budget of {device} has {left_t} free (loaded "
                       "models, jobs and running requests hold the rest)",
                       hint="lower max_tokens, retry when running requests have finished, or "
                            "unload a model (llmctl ps, llmctl unload)")
        self.held[key] = (owner, need)

    def shrink(self, key: Hashable, nbytes: int) -> None:
        """The request turned out to need only ``nbytes``: keep that much (never more)."""
        if key in self.held:
            owner, had = self.held[key]
            self.held[key] = (owner, min(had, nbytes))

    def release(self, key: Hashable) -> None:
        self.held.pop(key, None)

    def release_owner(self, owner: Hashable) -> None:
        for key in [k for k, (o, _) in self.held.items() if o == owner]:
            del self.held[key]
