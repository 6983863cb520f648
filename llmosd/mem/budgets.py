"""Memory budgets from the config: a budget's text ("8GiB", "90%", "auto") -> bytes, per device.

``parse_size`` and ``parse_budget`` read the texts (``config`` uses them as its settings are
read); ``budgets_from_config`` turns a config's budgets into bytes once the devices' memory is
known (at the daemon's start: torch tells); ``check_budgets`` does what it can of that without
torch (``llmosd --print-config``).  Both refuse a bad budget with the same ConfigError (exit 78)
naming its key and where it was set.  No torch, and nothing of the daemon but ``mem.policy``
(for sizes in messages), so that ``config`` may import it.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

from llmctl.errors import ConfigError
from llmosd.mem.policy import size_text

log = logging.getLogger("llmosd.mem")

GiB = 1 << 30

__all__ = ["budgets_from_config", "check_budgets", "default_budget", "parse_budget", "parse_size"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB', '512 MB', '1048576' -> bytes.  ValueError on anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_budget(value) -> tuple[str, float]:
    """A budget: ('auto', 0) for 'auto'; ('percent', p) for '90%' (0 < p <= 100);
    ('bytes', n) for a size ('8GiB', '512MB', a TOML integer).  ValueError otherwise.  0 is
    valid here (host = 0 turns swapping off); a device's budget of 0 is refused where budgets
    become bytes (``budgets_from_config``)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        if text.lower() == "auto":
            return ("auto", 0)
        if text.endswith("%"):
            p = float(text[:-1])
            if not 0 < p <= 100:
                raise ValueError(value)
            return ("percent", p)
        n = parse_size(text)
    if n < 0:
        raise ValueError(value)
    return ("bytes", n)


def default_budget(device: str, total: int, ram: int, cuda_present: bool) -> int:
    """The budget of ``device`` when the config says nothing (or ``auto``): the CPU: RAM minus
    max(2 GiB, 25% of RAM) (a machine under ~2.7 GiB: a quarter of it); a CUDA device: 90% of
    it; the host tier: 0 on a CPU-only machine (no swapping), else min(RAM/4, 32 GiB)."""
    if device == "cpu":
        return max(ram - max(2 * GiB, ram // 4), ram // 4)
    if device == "host":
        return min(ram // 4, 32 * GiB) if cuda_present else 0
    return int(total * 0.9)


def _device_of(section: str) -> str:
    """Config section -> device name: cuda0 -> cuda:0."""
    return "cuda:" + section[4:] if section.startswith("cuda") else section


def _cuda_sections(count: int, texts: dict) -> list[str]:
    """cuda0..cuda{count-1} and every CUDA section configured (none without CUDA)."""
    if count <= 0:
        return []
    found = {f"cuda{i}" for i in range(count)} | {s for s in texts if s.startswith("cuda")}
    return sorted(found, key=lambda s: (len(s), s))


def budgets_from_config(cfg, device_memory: Callable[[str], int], ram: int,
                        cuda_count: int | bool) -> tuple[dict[str, int], int]:
    """({device: budget bytes}, host budget bytes) from ``cfg.budgets`` (section -> text, see
    ``config.parse_budget``).  ``cuda_count``: the CUDA devices this machine has
    (``torch.cuda.device_count()``; a bool is read as 1 or 0).  Devices: "cpu" always, every
    "cuda:N" below the count (each gets its default unless configured), and every CUDA device
    configured (a CUDA section is ignored on a machine without CUDA: one config file may serve
    both).  ``device_memory("cuda:N")`` gives a device's bytes (an exception: no such device);
    the CPU's and the host tier's memory is ``ram``.  Percentages are of that memory.
    ConfigError naming the key and its source for a budget of 0 on a device, or one larger
    than the memory behind it.  Without CUDA the host tier is the same RAM as the cpu budget:
    cpu + host more than the RAM is refused, and a default cpu budget is lowered by the host
    budget (together they keep the default's share for the system)."""
    count = int(cuda_count)
    cuda_present = count > 0
    texts = dict(getattr(cfg, "budgets", {}) or {})
    srcs = dict(getattr(cfg, "budget_sources", {}) or {})
    sections = ["cpu"] + _cuda_sections(count, texts)
    budgets, host = {}, 0
    for section in sections + ["host"]:
        device = _device_of(section)
        where = _where(section, srcs)
        if device.startswith("cuda"):
            try:
                total = int(device_memory(device))
            except Exception as e:   # torch raises AssertionError/RuntimeError for a bad index
                raise ConfigError(f"{where}: there is no device {device} ({e})",
                                  hint="budget only the CUDA devices this machine has") from None
            what = f"{device} has {size_text(total)}"
        else:
            total = ram
            what = f"this machine has {size_text(total)} of RAM"
        n = _resolve(section, texts.get(section, "auto"), total, what, where,
                     lambda: default_budget(device, total, ram, cuda_present))
        if section == "host":
            host = n
        else:
            budgets[device] = n
    if not cuda_present and host:
        budgets["cpu"] = _cpu_with_host(budgets["cpu"], host, ram, texts, srcs)
    return budgets, host


def _where(section: str, srcs: dict) -> str:
    """'devices.cpu.budget (flag --budget)': a budget's key and where it was set."""
    key = f"devices.{section}.budget"
    return f"{key} ({srcs[section]})" if section in srcs else key


def _resolve(section: str, text, total: int, what: str, where: str, default: Callable[[], int]) -> int:
    """One budget's bytes: ``text`` (see ``parse_budget``) of a device with ``total``
    bytes (``what`` says so in errors); ``default()`` for auto.  ConfigError naming ``where``
    for a bad text, 0 bytes on a device (not the host tier), or more than ``total``."""
    try:
        kind, value = parse_budget(text)
    except ValueError:
        raise ConfigError(f"{where} must be a size (8GiB), a percentage (90%) or auto, "
                          f"got {text!r}") from None
    if kind == "auto":
        n = default()
    elif kind == "percent":
        n = int(total * value / 100)
    else:
        n = int(value)
    if section != "host" and n <= 0:
        raise ConfigError(f"{where} = {text!r} is 0 bytes: every load would be refused",
                          hint="give a size or a percentage, or leave it out for the default")
    if n > total:
        raise ConfigError(f"{where} = {text!r} ({size_text(n)}) is more than {what}",
                          hint=f"give at most {size_text(total)} ({total} bytes), or a percentage")
    return n


def check_budgets(cfg, ram: int, cuda_count: int | None) -> dict[str, int | None]:
    """The budgets of ``cfg`` checked and resolved without torch (``llmosd --print-config``,
    and ``config.load`` for the daemon's own settings): {section: bytes, or None where
    unknown here}, raising the ConfigError ``budgets_from_config`` would raise at start.
    ``cuda_count`` 0: no CUDA here (then the check is the daemon's own, CUDA sections being
    ignored: None); None: CUDA may be present (only torch can tell its devices and their
    memory): cpu and host are checked against ``ram`` alone, CUDA sections only for 0 bytes,
    and the CPU-only rule (cpu + host within the RAM) is left to the start."""
    texts = dict(getattr(cfg, "budgets", {}) or {})
    cuda = {s: None for s in texts if s.startswith("cuda")}
    if cuda_count == 0:
        budgets, host = budgets_from_config(cfg, lambda d: 0, ram, 0)
        return {"cpu": budgets["cpu"], "host": host, **cuda}
    srcs = dict(getattr(cfg, "budget_sources", {}) or {})
    out: dict[str, int | None] = {}
    for section in ("cpu", "host"):
        text = texts.get(section, "auto")
        known = section == "cpu" or parse_budget(text)[0] != "auto"   # host's default needs CUDA's count
        n = _resolve(section, text, ram, f"this machine has {size_text(ram)} of RAM",
                     _where(section, srcs), lambda: default_budget("cpu", ram, ram, True))
        out[section] = n if known else None
    for section in cuda:
        if parse_budget(texts[section]) == ("bytes", 0):
            _resolve(section, texts[section], 1, "", _where(section, srcs), lambda: 0)
    return {**out, **cuda}


def _cpu_with_host(cpu: int, host: int, ram: int, texts: dict, srcs: dict) -> int:
    """The cpu budget on a machine without CUDA, where the host tier is the same RAM: a
    default one lowered by ``host``; ConfigError when cpu + host is more than the RAM (or a
    default one would be left with nothing)."""
    def where(section):
        return _where(section, srcs)
    why = ("without CUDA the host tier (swapped instances) is the same RAM as the cpu budget")
    if parse_budget(texts.get("cpu", "auto"))[0] == "auto":
        if cpu - host <= 0:
            raise ConfigError(f"{where('host')} = {size_text(host)} leaves nothing of the default "
                              f"cpu budget ({size_text(cpu)} of {size_text(ram)} of RAM): {why}",
                              hint=f"give host less than {size_text(cpu)}, or host=0 (eviction "
                                   "then unloads; the default without CUDA)")
        log.info("cpu budget lowered from %s to %s: the host tier's %s is the same RAM",
                 size_text(cpu), size_text(cpu - host), size_text(host))
        return cpu - host
    if cpu + host > ram:
        raise ConfigError(f"{where('cpu')} = {size_text(cpu)} plus {where('host')} = "
                          f"{size_text(host)} is {size_text(cpu + host)}, more than this machine "
                          f"has ({size_text(ram)} of RAM): {why}",
                          hint=f"lower them so that together they fit in {size_text(ram)} (and "
                               "leave the system some), or set host=0: eviction then unloads")
    return cpu
