"""Device and dtype choice, and what a device has: the daemon's view of its hardware.

- ``resolve_device``: the configured name (``auto``, ``cpu``, ``cuda``, ``cuda:1``) -> a device,
  always indexed on CUDA (``cuda:N``: the name budgets and jobs use), refusing CUDA where there
  is none.
- ``resolve_dtype``: the configured name -> the dtype weights are computed in (``auto``: bfloat16
  on CUDA, float32 on the CPU).
- ``device_memory``: the bytes of memory a device's tensors live in (the memory manager's
  budgets will start from it).

The name -> torch dtype table (``DTYPES``) stays in ``models/loader.py`` and is imported from
there: the rule is that ``models/`` imports nothing of the daemon but ``store/``, and the
checkpoint formats (``formats/``) need the same table to convert weights, so its home is the
lowest layer that uses it; this module only adds the daemon's choice on top.
"""
from __future__ import annotations

import os

import torch

from llmctl.errors import InvalidArgument
from llmosd.models.loader import DTYPES

__all__ = ["DTYPES", "device_memory", "resolve_device", "resolve_dtype"]


def resolve_device(name: str) -> torch.device:
    """Always an indexed device for CUDA (its str is the memory manager's name, "cuda:0", the
    key of its budget): ``auto`` is the current CUDA device if there is one, else the CPU;
    ``cuda`` is the current CUDA device (cuda:0 unless changed).  InvalidArgument when a CUDA
    device is asked for and none is available, or its index is out of range."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise InvalidArgument(f"device {name} asked for, but no CUDA device is available",
                              hint="set device = \"cpu\" (or \"auto\") in llmosd.toml")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise InvalidArgument(f"device {name} asked for, but this machine has {count} CUDA "
                              f"device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})",
                              hint="set device = \"cuda:N\" with N below the count, or \"auto\"")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere; else the dtype of that name."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def device_memory(device: torch.device) -> int:
    """Total bytes of the memory ``device``'s tensors live in: the device's own memory on CUDA,
    physical RAM on the CPU (4 GiB when the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 4 << 30
