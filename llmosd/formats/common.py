"""What every checkpoint format shares: the one error a checkpoint that cannot be converted
raises, and the weight checks every reader runs.  Runs in job workers (torch, via the model)."""
from __future__ import annotations

from llmosd.models import llama
from llmosd.models.llama import LlamaConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported (bad config, tensors, vocabulary or file); the
    message names the problem.  A ValueError: the job reports it as invalid input."""


def check_shapes(cfg: LlamaConfig, shapes: dict[str, tuple], source: str = "config.json") -> list[str]:
    """``llama.check_shapes`` for a checkpoint: CheckpointError naming the first missing,
    misshapen or unexpected tensor; returns the names the model uses, in order.  Works on the
    shapes alone, before any tensor is read."""
    try:
        return llama.check_shapes(cfg, shapes, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def check_weights(cfg: LlamaConfig, sd: dict, source: str = "config.json") -> dict:
    """Keep the tensors the model uses, in order, contiguous; CheckpointError naming the first
    missing or misshapen one."""
    names = check_shapes(cfg, {k: tuple(v.shape) for k, v in sd.items()}, source)
    return {k: sd[k].contiguous() for k in names}

