"""Checks of job specs that run in the daemon before any work starts: pure and torch-free
(``ops`` imports this; the worker runs the job).  Each raises ValueError naming the first bad
field; ``ops.jobs`` turns that into InvalidArgument.  (``llmctl train`` specs come here too.)"""
from __future__ import annotations

import math

LIMITS = {"layers": (1, 256), "dim": (8, 16384), "heads": (1, 256), "vocab_size": (300, 262144),
          "context": (16, 1 << 20), "hidden_dim": (8, 65536)}


def check_spec(spec: dict) -> None:
    """A ``create`` spec: sizes in LIMITS, heads that divide, rotary-compatible head size, text."""
    for k, (lo, hi) in LIMITS.items():
        v = spec.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi):
            raise ValueError(f"{k} must be an integer between {lo} and {hi}, got {v!r:.40}")
    kv, rt = spec.get("kv_heads"), spec.get("rope_theta")
    if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool)):
        raise ValueError(f"kv_heads must be an integer, got {kv!r:.40}")
    if rt is not None and not (isinstance(rt, (int, float)) and not isinstance(rt, bool)
                               and math.isfinite(rt) and rt > 0):
        raise ValueError(f"rope_theta must be a finite number greater than 0, got {rt!r:.40}")
    dim, heads = spec["dim"], spec["heads"]
    kv = spec.get("kv_heads") or heads
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    if (dim // heads) % 2:
        raise ValueError(f"head size dim/heads = {dim // heads} must be even for rotary embeddings")
    if kv < 1 or heads % kv:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv})")
    if not spec["text"]:
        raise ValueError("the vocabulary text is empty")


def default_hidden(dim: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of 32."""
    return (int(8 * dim / 3) + 31) // 32 * 32
