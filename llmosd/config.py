"""The daemon's settings: defaults, then the TOML file, then LLMOSD_* variables, then flags.

Each layer overrides the one before.  ``Config.load`` returns the effective settings plus the
source each value came from (shown by ``llmosd --print-config``).

Memory budgets (issue 12) are per device: ``[devices.cpu] budget = "8GiB"``, ``[devices.cuda0]
budget = "90%"``, ``[devices.host] budget = "4GiB"`` (the host tier, where swapped instances
wait), ``LLMOSD_BUDGET="cpu=8GiB,host=2GiB"`` and ``llmosd --budget DEVICE=SIZE`` (repeatable),
each overriding the one before per device.  A budget is a size, a percentage of the device's
memory, or ``auto``; it is kept as text (``Config.budgets``): turning it into bytes needs the
device's memory, which ``mem.budgets.budgets_from_config`` knows at start.  ``load`` of the
process's own settings (the daemon, ``--print-config``) also checks the budgets against this
machine without torch (``mem.budgets.check_budgets``), so that ``--print-config`` refuses what
the daemon would refuse, with the same ConfigError (exit 78); ``render`` shows the bytes an
``auto`` or percentage budget comes to.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields

from llmctl import paths
from llmctl.errors import ConfigError
from llmctl.protocol import DEFAULT_MAX_MESSAGE
from llmosd.mem import budgets
from llmosd.mem.budgets import parse_budget, parse_size
from llmosd.mem.policy import size_text


@dataclass
class Config:
    socket: str = ""                 # "" = by mode (see llmctl.paths)
    state_dir: str = ""              # "" = by mode
    user: bool = False               # user mode: XDG paths even as root
    log_level: str = "info"
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    dtype: str = "auto"              # auto (float32 on CPU, bfloat16 on CUDA) | float32 | float16 | bfloat16
    threads: int = 0                 # torch intra-op threads; 0 = auto (the physical cores)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE
    send_hwm: int = 1000             # messages queued per client before backpressure
    stream_buffer: int = 64          # chunks a slow client may lag before its generation pauses
    heartbeat_ms: int = 1000         # beat to idle streams; dead peers noticed on the next beat
    default_max_tokens: int = 256
    max_batch: int = 16              # sequences decoded together in one batched step of an instance
    max_prefill_tokens: int = 128    # prompt (and score/embed/classify) tokens per engine step: a
    #                                  long prompt is cut into chunks so running decodes keep going
    max_waiting: int = 256           # requests queued on one instance before new ones get `busy`
    kv_block_size: int = 16          # positions per block of the paged KV cache
    compile: str = "auto"            # torch.compile of the decode kernels: auto (when a C++ compiler
    #                                  works) | on | off
    activations: str = "float32"     # few-row quantized matmuls (decode) on the CPU: float32, or
    #                                  int8 per group of 32 with VNNI (as llama.cpp; ~1.7x faster)
    quant: str = "auto"              # weights of a load without --quant: auto (as stored) | none
    #                                  (dequantized to dtype) | int8 | int4
    shutdown_grace_s: float = 3.0    # SIGTERM: how long in-flight work may finish
    socket_mode: int = 0o660         # octal: 660, 0660 and 0o660 all mean rw-rw----
    max_uploads: int = 64            # open uploads in the whole daemon (each holds a descriptor)
    max_uploads_per_client: int = 8  # open uploads per client connection
    max_kv_bytes: int = 0            # bytes of each instance's paged KV-cache pool; 0 = auto
    #                                  (min(RAM/4, 1 GiB), at least one full context)
    max_jobs: int = 1                # jobs (create, import, train) running at once per device
    job_stop_timeout_s: float = 30.0  # pause/cancel: how long a worker may take before SIGKILL
    metrics_port: int = 0            # Prometheus text on http://127.0.0.1:PORT/metrics; 0 = off
    # access (issue 14; llmosd.access): the admins' group (root always is one), whether others may
    # run requests on a model/instance they do not own, and [quotas.users.NAME] /
    # [quotas.groups.NAME] tables (max_instances, max_device_bytes, max_jobs, max_queued_requests)
    admin_group: str = ""
    shared_inference: bool = True
    quotas: dict = field(default_factory=dict, metadata={"internal": True})
    keep_alive: float = 300.0        # seconds an idle instance stays loaded; -1 forever, 0 unload at once
    # section ("cpu", "cuda0", "host") -> budget text ("8GiB", "90%", "auto"); and each one's source
    budgets: dict = field(default_factory=dict, metadata={"internal": True})
    budget_sources: dict = field(default_factory=dict, metadata={"internal": True})
    # tcp:// sockets only (CURVE): "" = <config dir>/curve/server.key_secret and <config dir>/curve/authorized
    curve_server_key: str = ""       # the server's secret key file (llmctl keygen --server)
    curve_authorized_dir: str = ""   # authorized clients' public keys (*.key), read at start
    config_file: str = field(default="", metadata={"internal": True})
    system: bool = field(default=False, metadata={"internal": True})   # --system: system paths, any uid

    def resolved(self) -> "Config":
        """Fill mode-dependent paths: system mode with ``system`` (--system), or as root
        without ``user``; else user mode."""
        c = dataclasses.replace(self)
        system = c.system or (os.getuid() == 0 and not c.user)
        if not c.socket:
            c.socket = paths.SYSTEM_SOCKET if system else paths.user_socket()
        else:
            c.socket = paths.normalize_socket(c.socket)
        if not c.state_dir:
            c.state_dir = paths.SYSTEM_STATE_DIR if system else paths.user_state_dir()
        return c

    def torch_threads(self) -> int:
        """``threads``, or when it is 0 the physical cores this process may run on (its CPU
        affinity; SMT siblings count once, by package and core id from sysfs), never more than
        its cgroup CPU quota allows, at least 1.  Pure reads of /proc and /sys; no psutil."""
        if self.threads > 0:
            return self.threads
        # One thread per physical core: what torch itself and llama.cpp pick by default (SMT
        # siblings share a core's vector units, so a second thread per core only adds OpenMP
        # sync).  Measured with bench/bench_engine.py (row T) on a 2-core VM: with the machine
        # otherwise quiet, SmolLM2 decode with 2 threads ran 1.3x (llmosd) and 1.8x (llama.cpp)
        # the speed of 1 thread; while other processes kept it busy (load ~4) 2 threads ran at
        # 0.10-0.25x of 1 thread, llmosd and llama.cpp alike, as a thread team stalls whenever
        # one of its cores is taken.  So this default suits a machine given to llmosd; on a
        # shared one set threads = 1.
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        cores = set()
        for cpu in cpus:
            topo = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
            try:
                with open(topo + "physical_package_id") as p, open(topo + "core_id") as c:
                    cores.add((p.read().strip(), c.read().strip()))
            except OSError:
                cores.add(("cpu", str(cpu)))       # no topology (some containers): count it alone
        n = len(cores)
        try:                                       # cgroup v2 "quota period" (or "max")
            with open("/sys/fs/cgroup/cpu.max") as f:
                quota, period = f.read().split()[:2]
            if quota != "max":
                n = min(n, -(-int(quota) // int(period)))
        except (OSError, ValueError):
            pass
        return max(1, n)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_KEYS = {f.name: f for f in fields(Config) if not f.metadata.get("internal")}


def _coerce(key: str, value, source: str):
    typ = _KEYS[key].type
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            if key == "socket_mode":
                return parse_mode(value)
            if key.endswith("_bytes") and isinstance(value, str):
                return parse_size(value)
            return int(value, 0) if isinstance(value, str) else int(value)
        if typ == "float":
            if key == "keep_alive":
                return parse_duration(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{key}' must be {typ}, got {value!r}") from None


def parse_mode(value) -> int:
    """A file mode is octal however it is written: '660', '0660', '0o660', TOML 0o660 (and a
    TOML integer 660, whose digits are read as octal).  ValueError past 0o777."""
    if isinstance(value, int):
        mode = int(str(value), 8) if value > 0o777 else value
    else:
        mode = int(str(value).strip().lower().removeprefix("0o") or "x", 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(value)
    return mode


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value) -> float:
    """A keep-alive: seconds as a number or text ('300', '2.5'), or with units ('5m', '1h30m',
    '45s', '1d').  Any negative value means forever and becomes -1.0.  ValueError otherwise."""
    import math
    import re
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        secs = float(value)
    else:
        text = str(value).strip().lower()
        neg, body = text.startswith("-"), text.removeprefix("-")
        part = r"(\d+(?:\.\d+)?)\s*([a-z]*)\s*"
        parts = re.findall(part, body)
        if not re.fullmatch(f"(?:{part})+", body) or any(u not in _DURATION_UNITS for _, u in parts):
            raise ValueError(value)
        secs = sum(float(n) * _DURATION_UNITS[u] for n, u in parts) * (-1 if neg else 1)
    if not math.isfinite(secs):
        raise ValueError(value)
    return -1.0 if secs < 0 else secs


def budget_section(name: str) -> str:
    """The config section of a device name: cpu, host, cuda0..cudaN ('cuda' and 'cuda:N' are
    accepted and become cuda0 / cudaN).  ValueError for anything else."""
    import re
    n = str(name).strip().lower()
    if n in ("cpu", "host"):
        return n
    if n == "cuda":
        return "cuda0"
    m = re.fullmatch(r"cuda:?(\d{1,3})", n)
    if m:
        return f"cuda{int(m.group(1))}"
    raise ValueError(name)


def _budget_pairs(text: str, source: str) -> list[tuple[str, str]]:
    """'cpu=8GiB,host=2GiB' -> [('cpu', '8GiB'), ('host', '2GiB')] (ConfigError naming ``source``)."""
    out = []
    for item in (p.strip() for p in str(text).split(",")):
        if not item:
            continue
        dev, eq, size = item.partition("=")
        if not eq:
            raise ConfigError(f"{source}: budget {item!r} must be DEVICE=SIZE, e.g. cpu=8GiB or cuda0=90%")
        out.append((dev.strip(), size.strip()))
    return out


def _set_budget(budgets: dict, sources: dict, dev: str, value, source: str) -> None:
    try:
        section = budget_section(dev)
    except ValueError:
        raise ConfigError(f"{source}: unknown device {dev!r} for a budget",
                          hint="devices are cpu, cuda0 (cuda1, ...) and host (the swap tier)") from None
    try:
        parse_budget(value)
    except ValueError:
        raise ConfigError(f"{source}: devices.{section}.budget must be a size (8GiB, 512MB), a "
                          f"percentage of the device's memory (90%) or auto, got {value!r}") from None
    budgets[section] = value if isinstance(value, int) and not isinstance(value, bool) else str(value).strip()
    sources[section] = source


def default_config_file(user: bool, system: bool = False) -> str:
    return paths.SYSTEM_CONFIG if system or (os.getuid() == 0 and not user) else paths.user_config()


def key_line(text: str, key: str, table: str | None = None) -> int | None:
    """The 1-based line of ``text`` (TOML) where ``key`` is set (``key = ...``), with ``table``
    the first such line after the header ``[table]`` (or the header's line when ``key`` is
    empty); None when not found.  For error messages only: tomllib gives no positions for
    values it accepted."""
    import re
    header = rf"\s*\[\s*{re.escape(table)}\s*\]" if table else None
    assign = rf"\s*[\"']?{re.escape(key)}[\"']?\s*="
    inside = header is None
    for n, line in enumerate(text.splitlines(), 1):
        if not inside:
            inside = bool(re.match(header, line))
            if inside and not key:
                return n
        elif key and re.match(assign, line):
            return n
    return None


def _where(path: str, text: str, key: str, table: str | None = None) -> str:
    """``path line N`` naming where ``key`` (or ``[table]``) is set in the file, or ``path``."""
    n = key_line(text, key, table)
    return f"{path} line {n}" if n else path


def machine() -> tuple[int, int | None]:
    """(RAM bytes, CUDA devices) of this machine, without torch: the CUDA count is 0 when no
    GPU driver is there (no NVIDIA, ROCm or WSL GPU device node), else None: unknown (only
    torch can tell).  RAM as ``mem.devices.device_memory`` reads it (4 GiB when unknown)."""
    import glob
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        ram = 4 << 30
    gpu = (os.path.exists("/proc/driver/nvidia") or glob.glob("/dev/nvidia[0-9]*")
           or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))
    return ram, (None if gpu else 0)


def check_budgets(cfg: Config, hardware: tuple[int, int | None] | None = None) -> dict:
    """{section: bytes or None} of ``cfg``'s budgets on ``hardware`` ((RAM, CUDA count or
    None), default this ``machine()``); ConfigError (exit 78) as the daemon would refuse them
    at start (see ``mem.budgets.check_budgets``)."""
    ram, cuda = hardware if hardware is not None else machine()
    return budgets.check_budgets(cfg, ram, cuda)


def load(config_file: str | None = None, flags: dict | None = None,
         environ: dict | None = None, *, hardware=None) -> tuple[Config, dict]:
    """Build the effective Config.  Returns (config, {key: source}).  The budgets are checked
    against ``hardware`` ((RAM bytes, CUDA count or None): see ``check_budgets``); by default
    against this ``machine()`` when ``environ`` is None (the process's own settings: the daemon,
    ``--print-config``), and only for their form when an ``environ`` is given (settings read
    for another machine, or a test's)."""
    if hardware is None and environ is None:
        hardware = machine()
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict = {}
    sources = {k: "default" for k in _KEYS}
    budgets: dict = {}
    bsources: dict = {}
    quotas: dict = {}
    flag_budgets = flags.pop("budget", None) or []
    system = bool(flags.pop("system", False))
    user = bool(flags.get("user")) or _coerce("user", environ.get("LLMOSD_USER", "0"), "LLMOSD_USER")
    if system and user:
        raise ConfigError("--system and --user exclude each other",
                          hint="the systemd unit passes --system; drop --user (or LLMOSD_USER)")
    explicit = config_file or environ.get("LLMOSD_CONFIG")
    path = explicit or default_config_file(user, system)
    text = ""
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8", errors="replace")
            data = tomllib.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        devices = data.get("devices", {})
        from llmosd.access import parse_quotas
        inner = data.get("llmosd") if isinstance(data.get("llmosd"), dict) else {}
        quotas = parse_quotas(data.get("quotas", inner.get("quotas")), path)
        data = data.get("llmosd", data)  # accept a [llmosd] table or top-level keys
        if data is not devices and "devices" in data:      # [llmosd.devices.cpu] works too
            devices = {**devices, **data["devices"]}
        if not isinstance(devices, dict):
            raise ConfigError(f"{path}: 'devices' must be tables like [devices.cpu]")
        for dev, table in devices.items():
            at = _where(path, text, "budget", f"devices.{dev}")
            if at == path:
                at = _where(path, text, "budget", f"llmosd.devices.{dev}")
            if not isinstance(table, dict) or set(table) - {"budget"}:
                raise ConfigError(f"{at}: [devices.{dev}] may hold only 'budget'",
                                  hint='e.g. [devices.cpu] budget = "8GiB"')
            if "budget" in table:
                _set_budget(budgets, bsources, dev, table["budget"], f"file {at}")
                bsources[budget_section(dev)] = f"file {path}"
        for k, v in data.items():
            if k in ("devices", "quotas"):
                continue
            if k not in _KEYS:
                raise ConfigError(f"{_where(path, text, k)}: unknown setting '{k}'",
                                  hint="known settings: " + ", ".join(sorted(_KEYS)))
            values[k], sources[k] = _coerce(k, v, _where(path, text, k)), f"file {path}"
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")
    for k in _KEYS:
        var = "LLMOSD_" + k.upper()
        if var in environ:
            values[k], sources[k] = _coerce(k, environ[var], var), f"env {var}"
    if "LLMOSD_BUDGET" in environ:
        for dev, size in _budget_pairs(environ["LLMOSD_BUDGET"], "LLMOSD_BUDGET"):
            _set_budget(budgets, bsources, dev, size, "env LLMOSD_BUDGET")
    for item in ([flag_budgets] if isinstance(flag_budgets, str) else flag_budgets):
        for dev, size in _budget_pairs(item, "--budget"):
            _set_budget(budgets, bsources, dev, size, "flag --budget")
    for k, v in flags.items():
        values[k], sources[k] = _coerce(k, v, "--" + k.replace("_", "-")), "flag"
    cfg = Config(**values, budgets=budgets, budget_sources=bsources, quotas=quotas,
                 config_file=path if os.path.exists(path) else "", system=system)
    for section, src in bsources.items():
        sources[f"devices.{section}.budget"] = src
    resolved = cfg.resolved()
    for k in ("socket", "state_dir"):
        if not getattr(cfg, k):
            sources[k] = ("default (system mode)" if system or not (resolved.user or os.getuid() != 0)
                          else "default (user mode)")

    def origin(key: str) -> str:        # "FILE line N: ", "env VAR: " or "flag --x: "
        src = sources.get(key, "default")
        if src.startswith("file "):
            return _where(path, text, key) + ": "
        return "" if src == "default" else f"{src}: "
    if resolved.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"{origin('log_level')}log_level must be debug, info, warning, error or "
                          f"critical, got {resolved.log_level!r}")
    if not (resolved.device in ("auto", "cpu", "cuda") or resolved.device.startswith("cuda:")):
        raise ConfigError(f"{origin('device')}device must be auto, cpu, cuda or cuda:N, got {resolved.device!r}")
    if resolved.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ConfigError(f"{origin('dtype')}dtype must be auto, float32, float16 or bfloat16, "
                          f"got {resolved.dtype!r}")
    if resolved.compile not in ("auto", "on", "off"):
        raise ConfigError(f"{origin('compile')}compile must be auto, on or off, got {resolved.compile!r}")
    if resolved.activations not in ("float32", "int8"):
        raise ConfigError(f"{origin('activations')}activations must be float32 or int8, "
                          f"got {resolved.activations!r}")
    if resolved.quant not in ("auto", "none", "int8", "int4"):
        raise ConfigError(f"{origin('quant')}quant must be auto, none, int8 or int4, got {resolved.quant!r}")
    for key, lo, hi in (("max_prefill_tokens", 1, 1 << 20), ("max_waiting", 1, 1 << 20),
                        ("kv_block_size", 1, 4096)):
        if not lo <= getattr(resolved, key) <= hi:
            raise ConfigError(f"{origin(key)}{key} must be between {lo} and {hi}, "
                              f"got {getattr(resolved, key)}")
    if resolved.max_jobs < 1:
        raise ConfigError(f"{origin('max_jobs')}max_jobs must be at least 1, got {resolved.max_jobs}")
    if not 0 <= resolved.job_stop_timeout_s <= 86400:
        raise ConfigError(f"{origin('job_stop_timeout_s')}job_stop_timeout_s must be between 0 and "
                          f"86400 seconds, got {resolved.job_stop_timeout_s:g}")
    if not 0 <= resolved.metrics_port <= 65535:
        raise ConfigError(f"{origin('metrics_port')}metrics_port must be a TCP port (1 to 65535) "
                          f"or 0 (off), got {resolved.metrics_port}")
    if hardware is not None:
        check_budgets(resolved, hardware)
    return resolved, sources


# Keys a SIGHUP reload applies to the running daemon (main.apply_reload); every other key (and
# the budgets) is read at start only: the socket, paths, device and dtype are bound then, and the
# memory manager has no setter for its budgets.
RELOADABLE = ("log_level", "keep_alive", "default_max_tokens", "max_batch", "stream_buffer",
              "max_prefill_tokens", "max_waiting",
              "max_uploads", "max_uploads_per_client", "max_kv_bytes", "max_jobs",
              "job_stop_timeout_s", "admin_group", "shared_inference", "quotas")


def reload_changes(old: Config, new: Config) -> tuple[dict, dict]:
    """What a reload from ``old`` to ``new`` changes: ({key: (old, new)} of RELOADABLE keys,
    {key: (old, new)} of keys that need a restart, budgets as ``devices.SECTION.budget``)."""
    apply, restart = {}, {}
    for k in _KEYS:
        a, b = getattr(old, k), getattr(new, k)
        if a != b:
            (apply if k in RELOADABLE else restart)[k] = (a, b)
    if old.quotas != new.quotas:            # [quotas.*] tables: internal, compared whole
        apply["quotas"] = (old.quotas, new.quotas)
    for section in sorted(set(old.budgets) | set(new.budgets)):
        a, b = old.budgets.get(section, "auto"), new.budgets.get(section, "auto")
        if a != b:
            restart[f"devices.{section}.budget"] = (a, b)
    return apply, restart


def render(cfg: Config, sources: dict, hardware=None) -> str:
    """TOML text of the effective config, each line commented with its source; an ``auto`` or
    percentage budget also with the bytes it comes to on ``hardware`` (default this
    ``machine()``; see ``check_budgets``): ``budget = "50%"  # = 12.6 GB; flag --budget``."""
    out = ["[llmosd]"]
    for k, f in _KEYS.items():
        v = getattr(cfg, k)
        if isinstance(v, bool):
            s = "true" if v else "false"
        elif isinstance(v, (int, float)):
            s = oct(v) if k == "socket_mode" else repr(v)
        else:
            s = '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{k} = {s}  # {sources.get(k, 'default')}")
    defaults = {"cpu": "auto: RAM minus max(2 GiB, 25% of RAM)", "cuda0": "auto: 90% of the device",
                "host": "auto: 0 without CUDA, else min(RAM/4, 32 GiB)"}
    if "host" in cfg.budgets and parse_budget(cfg.budgets["host"]) != ("bytes", 0):
        # without CUDA the host tier is the same RAM (mem.budgets.budgets_from_config)
        defaults["cpu"] += "; without CUDA lowered by the host budget, the same RAM"
    resolved, refused, cuda = _resolved_budgets(cfg, hardware)
    for section in sorted(set(defaults) | set(cfg.budgets), key=lambda d: (d != "cpu", d)):
        v = cfg.budgets.get(section, "auto")
        s = str(v) if isinstance(v, int) else '"' + str(v).replace('"', '') + '"'
        src = cfg.budget_sources.get(section) or f"default ({defaults.get(section, 'auto')})"
        n = resolved.get(section)
        if n is not None and _budget_kind(v) != "bytes":
            src = f"= {size_text(n)}; {src}"
        if section in cfg.budgets and section.startswith("cuda") and cuda == 0:
            src += "; ignored here: no CUDA device"
        out += ["", f"[devices.{section}]", f"budget = {s}  # {src}"]
    if refused:
        out += ["", f"# refused at start: {refused}"]
    return "\n".join(out) + "\n"


def _resolved_budgets(cfg: Config, hardware) -> tuple[dict, str, int | None]:
    """(check_budgets' bytes or {}, the refusal's text or '', the CUDA count) for ``render``,
    which prints whatever it is given."""
    hardware = hardware if hardware is not None else machine()
    try:
        return check_budgets(cfg, hardware), "", hardware[1]
    except ConfigError as e:
        return {}, " ".join(str(e).split()), hardware[1]


def _budget_kind(value) -> str:
    try:
        return parse_budget(value)[0]
    except ValueError:
        return ""
