"""The daemon's settings: defaults, then the TOML file, then LLMOSD_* variables, then flags.

Each layer overrides the one before.  ``Config.load`` returns the effective settings plus the
source each value came from (shown by ``llmosd --print-config``).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields

from llmctl import paths
from llmctl.errors import ConfigError
from llmctl.protocol import DEFAULT_MAX_MESSAGE


@dataclass
class Config:
    socket: str = ""                 # "" = by mode (see llmctl.paths)
    state_dir: str = ""              # "" = by mode
    user: bool = False               # user mode: XDG paths even as root
    log_level: str = "info"
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    dtype: str = "auto"              # auto (float32 on CPU, bfloat16 on CUDA) | float32 | float16 | bfloat16
    threads: int = 0                 # torch intra-op threads; 0 = auto (half the cores, at most 8)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE
    send_hwm: int = 1000             # messages queued per client before backpressure
    stream_buffer: int = 64          # chunks a slow client may lag before its generation pauses
    heartbeat_ms: int = 1000         # beat to idle streams; dead peers noticed on the next beat
    default_max_tokens: int = 256
    max_batch: int = 16              # requests stepped together on one instance
    shutdown_grace_s: float = 3.0    # SIGTERM: how long in-flight work may finish
    socket_mode: int = 0o660         # octal: 660, 0660 and 0o660 all mean rw-rw----
    max_uploads: int = 64            # open uploads in the whole daemon (each holds a descriptor)
    max_uploads_per_client: int = 8  # open uploads per client connection
    max_kv_bytes: int = 0            # KV-cache bytes all admitted requests may reserve; 0 = auto (RAM/4)
    max_jobs: int = 1                # jobs (create, import, train) running at once per device
    job_stop_timeout_s: float = 30.0  # pause/cancel: how long a worker may take before SIGKILL
    config_file: str = field(default="", metadata={"internal": True})

    def resolved(self) -> "Config":
        """Fill mode-dependent paths."""
        c = dataclasses.replace(self)
        system = os.getuid() == 0 and not c.user
        if not c.socket:
            c.socket = paths.SYSTEM_SOCKET if system else paths.user_socket()
        else:
            c.socket = paths.normalize_socket(c.socket)
        if not c.state_dir:
            c.state_dir = paths.SYSTEM_STATE_DIR if system else paths.user_state_dir()
        return c

    def torch_threads(self) -> int:
        if self.threads > 0:
            return self.threads
        # Measured: two-thread OpenMP work slows 4-10x when another process shares two cores,
        # one thread barely changes; so leave half the machine to everything else.
        return max(1, min(8, (os.cpu_count() or 2) // 2))

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
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{key}' must be {typ}, got {value!r}") from None


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


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


def parse_size(text: str) -> int:
    """'8GiB', '512 MB', '1048576' -> bytes.  ValueError on anything else."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_config_file(user: bool) -> str:
    return paths.SYSTEM_CONFIG if os.getuid() == 0 and not user else paths.user_config()


def load(config_file: str | None = None, flags: dict | None = None,
         environ: dict | None = None) -> tuple[Config, dict]:
    """Build the effective Config.  Returns (config, {key: source})."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict = {}
    sources = {k: "default" for k in _KEYS}
    user = bool(flags.get("user")) or _coerce("user", environ.get("LLMOSD_USER", "0"), "LLMOSD_USER")
    explicit = config_file or environ.get("LLMOSD_CONFIG")
    path = explicit or default_config_file(user)
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        data = data.get("llmosd", data)  # accept a [llmosd] table or top-level keys
        for k, v in data.items():
            if k not in _KEYS:
                raise ConfigError(f"{path}: unknown setting '{k}'",
                                  hint="known settings: " + ", ".join(sorted(_KEYS)))
            values[k], sources[k] = _coerce(k, v, path), f"file {path}"
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")
    for k in _KEYS:
        var = "LLMOSD_" + k.upper()
        if var in environ:
            values[k], sources[k] = _coerce(k, environ[var], var), f"env {var}"
    for k, v in flags.items():
        values[k], sources[k] = _coerce(k, v, "--" + k.replace("_", "-")), "flag"
    cfg = Config(**values, config_file=path if os.path.exists(path) else "")
    resolved = cfg.resolved()
    for k in ("socket", "state_dir"):
        if not getattr(cfg, k):
            sources[k] = "default (user mode)" if resolved.user or os.getuid() != 0 else "default (system mode)"
    if resolved.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"log_level must be debug, info, warning, error or critical, got {resolved.log_level!r}")
    if not (resolved.device in ("auto", "cpu", "cuda") or resolved.device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {resolved.device!r}")
    if resolved.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {resolved.dtype!r}")
    if resolved.max_jobs < 1:
        raise ConfigError(f"max_jobs must be at least 1, got {resolved.max_jobs}")
    if not 0 <= resolved.job_stop_timeout_s <= 86400:
        raise ConfigError(f"job_stop_timeout_s must be between 0 and 86400 seconds, "
                          f"got {resolved.job_stop_timeout_s:g}")
    return resolved, sources


def render(cfg: Config, sources: dict) -> str:
    """TOML text of the effective config, each line commented with its source."""
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
    return "\n".join(out) + "\n"
