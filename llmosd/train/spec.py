"""Checks of create and train specs that run in the daemon before any work starts: pure and
torch-free (``ops`` imports this; the worker runs the job).  Each raises ValueError naming the
first bad field; ``ops.jobs`` turns that into InvalidArgument.  (``llmctl train`` specs come here
too.)  The finetune and eval checks, built on these keys and ``typed_spec``, are ``train.ftspec``."""
from __future__ import annotations

import math
import re

from llmosd.train.data import VAL_FRACTION, documents, split_at

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
    check_heads(spec["dim"], spec["heads"], spec.get("kv_heads") or spec["heads"])
    if not spec["text"]:
        raise ValueError("the vocabulary text is empty")


def check_heads(dim: int, heads: int, kv: int) -> None:
    """Heads that divide the width, an even (rotary) head size, query heads a multiple of kv."""
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    if (dim // heads) % 2:
        raise ValueError(f"head size dim/heads = {dim // heads} must be even for rotary embeddings")
    if kv < 1 or heads % kv:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv})")


def default_hidden(dim: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of 32."""
    return (int(8 * dim / 3) + 31) // 32 * 32


# ---- train specs ------------------------------------------------------------------------------

TOKENIZERS = ("bpe", "unigram", "char")
DTYPES = ("auto", "float32", "bfloat16")
# Keys that fix the architecture or the tokenizer: a parent's are kept, so giving them is an error.
ARCH_KEYS = ("tokenizer", "vocab_size", "layers", "dim", "heads", "kv_heads")
INTS = {"vocab_size": (300, 262144), "layers": (1, 256), "dim": (8, 16384), "heads": (1, 256),
        "kv_heads": (1, 256), "block_size": (8, 1 << 16), "batch_size": (1, 1 << 16),
        "grad_accum": (1, 1 << 12), "max_steps": (1, 1 << 30), "warmup": (0, 1 << 30),
        "eval_every": (1, 1 << 30), "eval_batches": (1, 1 << 16),
        "checkpoint_every": (1, 1 << 30), "nproc": (1, 256), "seed": (0, (1 << 32) - 1)}
FLOATS = {"lr": (0.0, 10.0), "min_lr": (0.0, 10.0), "weight_decay": (0.0, 10.0),
          "dropout": (0.0, 0.95)}
CHOICES = {"tokenizer": TOKENIZERS, "dtype": DTYPES}
OTHER = ("device", "data")
TRAIN_KEYS = tuple(INTS) + tuple(FLOATS) + tuple(CHOICES) + OTHER
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,3})?)$")


def _int(k, v) -> int:
    lo, hi = INTS[k]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{k} must be an integer, got {v!r:.40}")
    if not lo <= v <= hi:
        raise ValueError(f"{k} must be between {lo:,} and {hi:,}, got {v:,}")
    return v


def _float(k, v) -> float:
    lo, hi = FLOATS[k]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{k} must be a number, got {v!r:.40}")
    if not lo <= v <= hi or (k == "lr" and v == 0):
        raise ValueError(f"{k} must be {'greater than' if k == 'lr' else 'at least'} {lo:g} and at "
                         f"most {hi:g}, got {v:g}")
    return float(v)


def typed_spec(spec: dict) -> dict:
    """Each given key checked for type and range (None = not given); unknown keys refused."""
    if not isinstance(spec, dict):
        raise ValueError(f"the train spec must be a mapping, not a {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in TRAIN_KEYS)
    if unknown:
        raise ValueError(f"unknown train spec key {unknown[0]!r}; known keys: {', '.join(TRAIN_KEYS)}")
    out = {}
    for k, v in spec.items():
        if v is None:
            continue
        if k in INTS:
            out[k] = _int(k, v)
        elif k in FLOATS:
            out[k] = _float(k, v)
        elif k in CHOICES:
            if v not in CHOICES[k]:
                raise ValueError(f"{k} must be one of {', '.join(CHOICES[k])}, got {v!r:.40}")
            out[k] = v
        elif k == "device":
            if not isinstance(v, str) or not _DEVICE.match(v):
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r:.40}")
            out[k] = v
        elif k == "data":
            if not isinstance(v, dict) or not all(isinstance(d, str) for d in v.values()):
                raise ValueError("data must map file names to blob digests")
            out[k] = dict(v)
    return out


def _defaults(s: dict) -> dict:
    """The spec with every default filled in (after typed_spec)."""
    steps = s.setdefault("max_steps", 1000)
    tok = s.setdefault("tokenizer", "bpe")
    if tok == "char" and "vocab_size" in s:
        raise ValueError("vocab_size does not apply to the char tokenizer (its vocabulary is the "
                         "data's characters); leave it out")
    s.setdefault("vocab_size", None if tok == "char" else 1024)
    for k, v in (("layers", 4), ("dim", 128), ("heads", 4), ("block_size", 128),
                 ("batch_size", 12), ("grad_accum", 1), ("lr", 1e-3), ("weight_decay", 0.1),
                 ("dropout", 0.0), ("eval_batches", 20), ("nproc", 1), ("seed", 0),
                 ("device", "auto"), ("dtype", "auto")):
        s.setdefault(k, v)
    s.setdefault("kv_heads", s["heads"])
    s.setdefault("min_lr", s["lr"] / 10)
    s.setdefault("warmup", min(100, steps // 10))
    s.setdefault("eval_every", min(250, steps))
    s.setdefault("checkpoint_every", s["eval_every"])
    if s["min_lr"] > s["lr"]:
        raise ValueError(f"min_lr ({s['min_lr']:g}) must not exceed lr ({s['lr']:g})")
    if s["warmup"] > steps:
        raise ValueError(f"warmup ({s['warmup']:,}) must not exceed max_steps ({steps:,})")
    check_heads(s["dim"], s["heads"], s["kv_heads"])
    return s


def _data_chars(data: dict) -> int:
    """Characters in the data (every file parsed: a bad file or JSONL line raises ValueError)."""
    if not isinstance(data, dict) or not data:
        raise ValueError("no data files: give at least one text or JSONL file")
    for name in data:
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"data file name {name!r:.60} must be a plain file name")
    return sum(len(d) + 1 for d in documents(data))        # +1: the end-of-text token after each


def min_tokens(block_size: int) -> int:
    """Fewest tokens that give one training block and one validation block of ``block_size``
    (block_size + 1 tokens each: inputs and their next-token targets) after the split."""
    need = block_size + 1
    n = 10 * (need - 1) + 1                  # the least n whose last tenth holds ``need``
    while split_at(n) < need or n - split_at(n) < need:
        n += 1
    return n


def check_train_spec(spec: dict, data: dict, parent: dict | None = None) -> dict:
    """Check a ``train`` spec against its data (``{file name: bytes}``) and, when training
    continues from a stored model, its ``parent`` (the daemon's ``{name, digest, config,
    tokenizer, weights}``); returns the spec with every default filled in.  Raises ValueError
    naming the first problem: an unknown key, a bad type or range, a bad JSONL line (with its
    file and line number), too little data for one block and one validation batch, or an
    architecture key given for an existing model.  Torch-free: runs on the daemon's loop."""
    given = typed_spec(spec)
    if parent is not None:
        fixed = [k for k in ARCH_KEYS if k in given]
        if fixed:
            name = parent.get("name") or "the existing model"
            raise ValueError(f"{fixed[0]} cannot be set when training continues from {name}: its "
                             "architecture and tokenizer are kept; leave it out, or train a new name")
    s = _defaults(dict(given))
    if parent is not None:
        for k in ARCH_KEYS:
            s[k] = None            # the parent's, read by the worker
        ctx = parent.get("context")    # the parent's max_position_embeddings (the daemon reads it)
        if isinstance(ctx, int) and "block_size" not in given:
            s["block_size"] = min(s["block_size"], ctx)    # a model trained at 64 goes on at 64
        if isinstance(ctx, int) and s["block_size"] > ctx:
            raise ValueError(f"block_size ({s['block_size']:,}) exceeds the context of "
                             f"{parent.get('name') or 'the model'} ({ctx:,})")
    chars = _data_chars(data)
    need = min_tokens(s["block_size"])
    if chars < need:
        raise ValueError(f"the data has {chars:,} characters: too little for one training block "
                         f"and one validation batch with block_size {s['block_size']:,} (the last "
                         f"{VAL_FRACTION:.0%} is held out for validation, so at least {need:,} are "
                         "needed); add data or lower block_size")
    return s
