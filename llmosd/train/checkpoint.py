"""Training checkpoints: written atomically, read back for resume and for the result.

``last.pt`` (every ``checkpoint_every`` steps, on pause, at the end) holds all a run needs to
continue bit for bit: the model and optimizer states, the step, the random generators' states
(torch, CUDA, numpy, python), the best validation loss so far, the tokenizer's bytes, the config
and the spec it was made with.  ``best.pt`` holds the weights of the best validation loss.
Batches and dropout masks are pure functions of (seed, step, rank, micro-step), so the step is
the data position.  Files are plain containers that ``torch.load(weights_only=True)`` reads.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

LAST, BEST = "last.pt", "best.pt"
VERSION = 1
# Spec keys that may differ between a checkpoint and the run resuming it: where it runs.
RUNTIME_KEYS = ("device",)


def rng_state() -> dict:
    """Every random generator a run draws from, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
           "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    """Restore what ``rng_state`` captured (CUDA only where this process has the devices)."""
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = st["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) <= torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file beside it, flushed to disk, then
    renamed over it (a crash leaves the old checkpoint or the new, never half of one)."""
    d = os.path.dirname(path) or "."
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str) -> dict | None:
    """The checkpoint at ``path`` on the CPU, or None when there is none."""
    if not os.path.exists(path):
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("version") != VERSION:
        raise ValueError(f"{path} is a checkpoint of another llmosd version; remove it to start over")
    return ck


def check_resumable(ck: dict, spec: dict) -> None:
    """ValueError when checkpoint ``ck`` was made with another spec than ``spec`` (resuming it
    would not continue the same run)."""
    old = {k: v for k, v in ck["spec"].items() if k not in RUNTIME_KEYS}
    new = {k: v for k, v in spec.items() if k not in RUNTIME_KEYS}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"the checkpoint at step {ck['step']:,} was made with another spec "
                         f"({diff[0]}: {old.get(diff[0])!r} then, {new.get(diff[0])!r} now)")
