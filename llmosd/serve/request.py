"""What the control loop hands to an engine: immutable values built by ``ops``, no torch.

- ``SamplingParams``: how the next token is chosen (``validate`` checks the ranges, purely).
- ``Request``: one generation's wire inputs, frozen.  Everything an engine learns or builds while
  running it (token ids, rendered chat prompt, KV cache, generator, decoder, counts, timings)
  is the engine's own per-sequence state, never written back here, so a request can be handed
  to another thread (later another process) as a plain value.
- ``Call``: a one-shot evaluation (score, embed, classify).
- Both carry ``adapter``: the key (the adapter's manifest digest) of the LoRA adapter or
  classification head, installed on the instance, that the request runs with; None runs
  exactly the base model.
- ``Task``: the control loop's record of a request it is responsible for, from arrival to the end
  of its stream; owned by the instance manager and touched only on the control-loop thread.

Contract: this module imports neither torch nor any daemon module that does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Hashable

from llmctl.errors import InvalidArgument

GREEDY_BELOW = 1e-5                 # temperatures below this are greedy (dividing would overflow)
PENALTY_RANGE = (0.01, 100.0)       # repetition penalties beyond act as the nearest bound


def invalid_argument(e: ValueError, hint: str = "") -> InvalidArgument:
    """The one conversion of a pure check's ``ValueError`` into the error a user sees."""
    return InvalidArgument(str(e), hint=hint)


def check_head_labels(trained: list[str], labels: list[str] | None) -> list[str]:
    """A trained classifier's labels to report, in the order asked: the trained ones, or
    ``labels`` if given (not empty), which must be the same set; ValueError naming them."""
    if not labels:
        return list(trained)
    if sorted(labels) != sorted(trained):
        raise ValueError(f"this classifier was trained on the labels {', '.join(trained)}; "
                         f"give those (or no labels), not {', '.join(labels)}")
    return list(labels)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1 = off
    min_p: float = 0.0      # 0 = off
    repetition_penalty: float = 1.0   # 1 = off
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if not all(math.isfinite(v) for v in (self.temperature, self.top_p, self.min_p,
                                                self.repetition_penalty)):
            raise ValueError("sampling settings must be finite numbers")
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature must be between 0 and 100, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        lo, hi = PENALTY_RANGE
        if not (lo <= self.repetition_penalty <= hi):
            raise ValueError(f"repetition_penalty must be in [{lo}, {hi:g}] (1 turns it off), "
                             f"got {self.repetition_penalty}")


@dataclass(frozen=True)
class Request:
    """One generation's inputs as they came off the wire (validated by ops).  Frozen: lists are
    stored as tuples (``messages`` as a tuple of fresh {role, content} dicts nobody writes)."""
    key: Hashable
    prompt: str
    max_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    add_bos: bool = True
    messages: tuple[dict, ...] | None = None   # chat: rendered with the model's template instead
    logprobs: int = 0              # report each token's logprob and this many alternatives
    adapter: str | None = None     # the installed adapter it runs with (None: the base alone)
    submitted: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        object.__setattr__(self, "stops", tuple(self.stops))
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))


@dataclass(frozen=True)
class Call:
    """A one-shot evaluation: ``evaluate.FUNCTIONS[name](model, tok, device, **args)``."""
    key: Hashable
    name: str
    args: dict
    adapter: str | None = None     # as Request.adapter


@dataclass
class Task:
    """A request the daemon is responsible for, from arrival to its stream's end.

    ``inst`` is the instance it waits for (``running`` false: counted in the instance's
    ``queued_requests``) or runs on (``running`` true)."""
    req: Request | Call
    stream: Any                    # server.Stream, or anything with chunk/end/error
    inst: Any = None               # table.Instance
    extra: dict | None = None      # merged into the final stats (load info)
    running: bool = False
    model: str | None = None       # the name the request used (its final stats name it)
