"""A load's options (issue 13: ``dtype`` and ``quant``) and the names an instance's row shows
of them; for the instance manager (``serve.instances``), on the control loop and its loader
threads.

- ``resolve_opts``: the {"dtype", "quant"} a load uses (the given ones, else the daemon's);
- ``check_opts``: InvalidArgument when a request names options its loaded instance lacks;
- ``load_kwargs``: ``load_model``'s keyword arguments for a quant; ``weights_text``: how a
  loaded model's weights are held ("float32", "int8", "q4_1"...);
- ``memory_device``: the memory manager's name of a device.
"""
from __future__ import annotations

import inspect
import logging

import torch

from llmctl.errors import InvalidArgument
from llmosd.models.loader import DTYPES, load_model

log = logging.getLogger("llmosd.instances")

QUANTS = ("auto", "none", "int8", "int4")      # a load's quant (the config's key's choices)


def weights_text(model) -> str | None:
    """How ``model``'s weights are held ("float32", "int8", "q4_1"...); None if unknown."""
    try:
        from llmosd.models.quant import describe
        return describe(model)
    except Exception:        # (never fatal to a load: it names, nothing else)
        log.debug("describing the weights failed", exc_info=True)
        return None


def load_kwargs(quant: str | None, loader=load_model) -> dict:
    """``loader``'s (``load_model``'s) keyword arguments for ``quant`` (none if it takes none)."""
    if quant is None or "quant" not in inspect.signature(loader).parameters:
        return {}
    return {"quant": quant}


def memory_device(device: torch.device) -> str:
    """The memory manager's name of ``device`` (its budgets' keys, the instances' rows):
    "cuda" without an index is "cuda:0", as a job's (``jobs.queue.mem_device``)."""
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)


def resolve_opts(load_opts: dict | None, dtype: torch.dtype, quant: str | None) -> dict:
    """{"dtype", "quant"} a load uses: the given ones, else the daemon's (``dtype``, and
    ``quant`` the config's)."""
    o = load_opts or {}
    name = o.get("dtype") or "auto"
    if name not in ("auto", *DTYPES) or o.get("quant") not in (None, *QUANTS):
        raise InvalidArgument(f"a load's dtype must be auto or one of {', '.join(DTYPES)} and its "
                              f"quant one of {', '.join(QUANTS)}, got {name} and {o.get('quant')}")
    return {"dtype": str(dtype).replace("torch.", "") if name == "auto" else name,
            "quant": o.get("quant") or quant or "auto"}


def check_opts(inst, load_opts: dict | None) -> None:
    """InvalidArgument if ``load_opts`` names options instance ``inst`` was not loaded with
    (the unnamed and "auto" ones match whatever it was loaded with)."""
    for k, v in (load_opts or {}).items():
        if v in (None, "auto") or inst.load_opts.get(k) in (None, v):
            continue
        held = inst.weights or inst.load_opts.get("dtype") or "?"
        raise InvalidArgument(
            f"{inst.model} is already loaded as {held} (instance {inst.id}, {k} "
            f"{inst.load_opts.get(k)}), not {k} {v}; unload it first",
            hint=f"llmctl unload {inst.id}, then load it with the options you want")
