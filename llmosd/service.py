"""``llmosd install-service``: the systemd unit, sysusers.d and tmpfiles.d files and the config.

The texts live here (not only in the repository's ``systemd/``) so that an installed package can
write them; ``systemd/`` holds the same texts as shipped (``tests/unit/test_service.py`` keeps
them equal).  ``install`` writes the unit with the ``ExecStart`` of *this* installation (the
interpreter running now, ``-m llmosd --system``), so the unit runs the code that wrote it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

# The unit.  {exec_start}, {protect_home} and {documentation} are filled by ``unit_text``.
UNIT = """\
# llmosd.service - written by `llmosd install-service`; see llmosd(8).
# Exposure (systemd-analyze security): about 1.2 on CPU.  Settings the daemon needs kept as
# they are: it writes its state and runtime directories, spawns job worker processes, runs
# threads, reads /proc/self and may listen on tcp:// (remote access, off by default).
[Unit]
Description=llmosd - an operating system for language models
{documentation}After=network.target

[Service]
# READY=1 once the socket answers, STATUS= lines, STOPPING=1; WATCHDOG=1 every WatchdogSec/2
# from a thread that first has the control loop run a no-op (a hung loop stops the pings).
Type=notify
NotifyAccess=main
WatchdogSec=60s
ExecStart={exec_start}
# SIGHUP reloads llmosd.toml without dropping clients (an invalid file is refused, logged)
ExecReload=/bin/kill -HUP $MAINPID
User=llmosd
Group=llmos
# /run/llmosd: the socket (0660) in a 0750 directory; clients join group llmos to connect.
RuntimeDirectory=llmosd
RuntimeDirectoryMode=0750
# /var/lib/llmosd: the model store and job records, the daemon's alone
StateDirectory=llmosd
StateDirectoryMode=0700
# /etc/llmosd/llmosd.toml (read whatever the uid: --system)
ConfigurationDirectory=llmosd
ConfigurationDirectoryMode=0755
UMask=0077
LimitNOFILE=65536
TimeoutStartSec=300s
TimeoutStopSec=60s
Restart=on-failure
RestartSec=2s
# 78 (EX_CONFIG): a bad config or another daemon on the socket; restarting cannot help
RestartPreventExitStatus=78

# Hardening.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateMounts=yes
PrivateIPC=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# remote access (tcp:// with CURVE keys) needs IPAddressAllow= for its clients in a drop-in
IPAddressDeny=any
IPAddressAllow=localhost
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
# Left off on purpose:
# - MemoryDenyWriteExecute=yes: torch's CPU kernels (oneDNN) generate code at run time
#   (bfloat16/float16 matmuls fail with "could not create a primitive" under it), and so
#   does the CUDA driver.
# - PrivateUsers=yes: the daemon would see every client uid but its own and root's as
#   nobody (65534), and ownership of models, instances and jobs is by the peer's uid.
# - PrivateNetwork=yes: it would make tcp:// remote access impossible.
#
# GPU (CUDA): add a drop-in (systemctl edit llmosd) with
#   [Service]
#   PrivateDevices=no
#   DeviceAllow=/dev/nvidiactl rw
#   DeviceAllow=/dev/nvidia-uvm rw
#   DeviceAllow=/dev/nvidia-uvm-tools rw
#   DeviceAllow=char-nvidia-frontend rw
#   DeviceAllow=char-nvidia-caps rw
#   SupplementaryGroups=video render
#   ProcSubset=all
# (char-nvidia-frontend is /dev/nvidia0, /dev/nvidia1, ...: DeviceAllow= takes no globs; the
# driver reads /proc/driver/nvidia, which ProcSubset=pid hides; AMD ROCm: /dev/kfd and
# /dev/dri/renderD* rw instead.)  Exposure then rises by about 0.2.

[Install]
WantedBy=multi-user.target
"""

SYSUSERS = """\
# sysusers.d(5) for llmosd: the daemon's user, and the group whose members may use its socket.
# Installed as /etc/sysusers.d/llmosd.conf; apply with `systemd-sysusers`.
g llmos    -
u llmosd   -:llmos "llmosd language-model daemon" /var/lib/llmosd
"""

TMPFILES = """\
# tmpfiles.d(5) for llmosd: its directories before the first start (the unit's
# StateDirectory= and ConfigurationDirectory= keep them so).  The runtime directory
# /run/llmosd is the unit's RuntimeDirectory=.  Apply with `systemd-tmpfiles --create`.
d /etc/llmosd      0755 root   root  -
d /var/lib/llmosd  0700 llmosd llmos -
"""

SAMPLE_CONFIG = """\
# /etc/llmosd/llmosd.toml - every key is optional; see llmosd(8).  Precedence:
# defaults < this file < LLMOSD_* environment variables < command-line flags.
# SIGHUP (systemctl reload llmosd) re-reads this file: log_level, keep_alive, default_max_tokens,
# max_batch, max_prefill_tokens, max_waiting, stream_buffer, max_uploads, max_uploads_per_client,
# max_kv_bytes, max_jobs, job_stop_timeout_s, admin_group, shared_inference and [quotas.*] apply
# at once; the other keys and the budgets need a restart.
[llmosd]
# socket = "ipc:///run/llmosd/llmosd.sock"
# state_dir = "/var/lib/llmosd"
# log_level = "info"
# device = "auto"          # auto | cpu | cuda | cuda:N
# dtype = "auto"           # auto (float32 on CPU, bfloat16 on CUDA) | float32 | float16 | bfloat16
# threads = 0              # torch threads; 0 = the physical cores (1 on a busy shared machine)
# max_message_bytes = 16777216
# send_hwm = 1000
# stream_buffer = 64
# heartbeat_ms = 1000
# default_max_tokens = 256
# max_batch = 16          # sequences decoded together in one batched step
# max_prefill_tokens = 128 # prompt tokens per engine step (long prompts are chunked)
# max_waiting = 256        # requests queued on one instance before `busy`
# kv_block_size = 16       # positions per block of the paged KV cache
# compile = "auto"         # torch.compile of the decode kernels: auto | on | off
# activations = "float32"  # decode matmuls of quantized weights on the CPU: float32 | int8 (VNNI, faster)
# quant = "auto"           # weights of a load without --quant: auto | none | int8 | int4
# shutdown_grace_s = 3.0
# socket_mode = 0o660      # octal however written: 660, 0660, 0o660
# user = false             # user mode: XDG paths even as root
# max_uploads = 64         # open uploads in the whole daemon (each holds a descriptor)
# max_uploads_per_client = 8
# max_kv_bytes = 0         # KV-cache bytes admitted generations may reserve; 0 = a quarter of RAM ("2GiB" works)
# max_jobs = 1             # jobs (create, import, train) running at once per device
# job_stop_timeout_s = 30.0  # pause/cancel: seconds a job's worker gets before SIGKILL
# metrics_port = 0          # Prometheus text on http://127.0.0.1:PORT/metrics (0: off; llmctl metrics always works)
# admin_group = ""         # members (and root, and the daemon's user) may unload/cancel/rm what others own
# shared_inference = true  # others may run requests on a model/instance they do not own
# keep_alive = "5m"        # an idle instance unloads after this ("300", "5m", "1h"); "-1" never, "0" at once
# Remote access: socket = "tcp://0.0.0.0:5555" is served only with CURVE keys (it refuses to start
# without them); make them with `llmctl keygen --server --dir /etc/llmosd/curve`, and copy each
# client's public key (`llmctl keygen` on its machine) into the authorized directory, then restart.
# curve_server_key = "/etc/llmosd/curve/server.key_secret"
# curve_authorized_dir = "/etc/llmosd/curve/authorized"   # *.key files; read at start

# Memory budgets per device (also LLMOSD_BUDGET="cpu=8GiB,host=2GiB" and llmosd --budget cpu=8GiB).
# A size ("8GiB", "512MB"), a percentage of the device's memory ("90%"), or "auto".
# [devices.cpu]
# budget = "auto"          # RAM minus max(2 GiB, 25% of RAM)
# [devices.cuda0]          # cuda1, cuda2, ... likewise (--budget cuda=... is cuda0)
# budget = "90%"
# [devices.host]           # the swap tier: instances swapped out of a device wait here, in RAM
# budget = "auto"          # 0 without CUDA (eviction unloads), else min(RAM/4, 32 GiB)
#                          # without CUDA it is the cpu budget's RAM: cpu + host must fit in RAM
#                          # (an "auto" cpu budget is lowered by it)

# Quotas per user or group (a user's own table wins; else the largest of their groups').  Exceeding
# one is refused (permission_denied) with the numbers.  Root and the daemon's user have none.
# [quotas.users.alice]
# max_instances = 2        # instances loaded by the user
# max_device_bytes = "8GiB"  # bytes those instances hold
# max_jobs = 1             # jobs not finished (queued, running, paused)
# max_queued_requests = 16 # requests open at once
# [quotas.groups.llmos]
# max_instances = 1
"""

HTTP_UNIT = """\
# llmosd-http.service - the HTTP gateway (OpenAI and Ollama APIs) to llmosd; see llmctl(1),
# serve-http.  It is an ordinary client of the daemon: it runs as a user of group llmos (which
# may open the daemon's socket) and acts with that user's rights.  Loopback only as shipped;
# to listen elsewhere, add a drop-in (systemctl edit llmosd-http) with
#   [Service]
#   ExecStart=
#   ExecStart=/usr/local/bin/llmctl serve-http --listen 0.0.0.0:11435 --api-key-file /etc/llmosd/http-keys
#   IPAddressAllow=any
# (the key file: one key per line, not readable by other users, e.g. root:llmos 0640).
[Unit]
Description=llmosd HTTP gateway - OpenAI and Ollama APIs
{documentation}After=llmosd.service network.target
Wants=llmosd.service

[Service]
Type=exec
ExecStart={exec_start}
DynamicUser=yes
SupplementaryGroups=llmos
Environment=LLMOSD_SOCKET=ipc:///run/llmosd/llmosd.sock
Restart=on-failure
RestartSec=2s
# 78 (EX_CONFIG): a bad --listen, a missing key file, non-loopback without keys
RestartPreventExitStatus=78
TimeoutStopSec=15s

# Hardening: it only talks HTTP and to the daemon's socket.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
IPAddressDeny=any
IPAddressAllow=localhost
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=multi-user.target
"""

SHIPPED_EXEC_START = "/usr/local/bin/llmosd --system"
SHIPPED_HTTP_EXEC_START = "/usr/local/bin/llmctl serve-http --listen 127.0.0.1:11435"
HTTP_MAN_PAGES = ("llmctl(1)", "llmosd(8)")
MAN_PAGES = ("llmosd(8)", "llmctl(1)", "llmosd-protocol(7)")
# where each file goes, relative to the prefix; the config only when absent
TARGETS = {"unit": "etc/systemd/system/llmosd.service", "sysusers": "etc/sysusers.d/llmosd.conf",
           "tmpfiles": "etc/tmpfiles.d/llmosd.conf", "config": "etc/llmosd/llmosd.toml",
           "http_unit": "etc/systemd/system/llmosd-http.service"}
# ProtectHome=yes hides these: code installed below them needs read-only instead
HOME_DIRS = ("/home", "/root", "/run/user")


def exec_start(python: str = sys.executable) -> str:
    """The unit's ExecStart for this installation: this interpreter with ``-m llmosd --system``
    (a virtual environment's python finds its packages by its own path, so no activation)."""
    return " ".join(shlex.quote(p) for p in (os.path.abspath(python), "-m", "llmosd", "--system"))


def http_exec_start(python: str = sys.executable) -> str:
    """The gateway unit's ExecStart for this installation: ``python -m llmctl.cli serve-http``
    on loopback (a drop-in changes --listen; see the unit's comment)."""
    return " ".join(shlex.quote(p) for p in (os.path.abspath(python), "-m", "llmctl.cli", "serve-http",
                                              "--listen", "127.0.0.1:11435"))


def http_unit_text(exec_start: str = SHIPPED_HTTP_EXEC_START, protect_home: str = "yes",
                   man_pages=HTTP_MAN_PAGES) -> str:
    """The gateway's unit (llmosd-http.service) with ``exec_start``."""
    doc = ("Documentation=" + " ".join(f"man:{p}" for p in man_pages) + "\n") if man_pages else ""
    return HTTP_UNIT.format(exec_start=exec_start, protect_home=protect_home, documentation=doc)


def needs_home(paths: list[str]) -> bool:
    """True when one of ``paths`` lies under a directory that ProtectHome=yes hides."""
    return any(os.path.abspath(p) == h or os.path.abspath(p).startswith(h + "/")
               for p in paths for h in HOME_DIRS)


def installed_man_pages(pages=MAN_PAGES) -> list[str]:
    """The pages of ``pages`` that ``man -w`` finds here (``systemd-analyze verify`` complains
    about a Documentation=man: page that is not installed)."""
    if not shutil.which("man"):
        return []
    found = []
    for page in pages:
        name, section = page[:-1].split("(")
        r = subprocess.run(["man", "-w", section, name], capture_output=True)
        if r.returncode == 0:
            found.append(page)
    return found


def unit_text(exec_start: str = SHIPPED_EXEC_START, protect_home: str = "yes",
              man_pages=MAN_PAGES) -> str:
    """The unit with ``exec_start``; ``Documentation=`` names ``man_pages`` (none: no line)."""
    doc = ("Documentation=" + " ".join(f"man:{p}" for p in man_pages) + "\n") if man_pages else ""
    return UNIT.format(exec_start=exec_start, protect_home=protect_home, documentation=doc)


def plan(prefix: str = "/", python: str = sys.executable, man_pages=None) -> dict[str, str]:
    """{absolute path: text} of what ``install`` writes under ``prefix`` (the config file only
    when it is not there yet)."""
    import llmosd
    code = [python, os.path.dirname(os.path.abspath(llmosd.__file__))]
    pages = installed_man_pages() if man_pages is None else man_pages
    texts = {"unit": unit_text(exec_start(python), "read-only" if needs_home(code) else "yes", pages),
             "sysusers": SYSUSERS, "tmpfiles": TMPFILES, "config": SAMPLE_CONFIG,
             "http_unit": http_unit_text(http_exec_start(python), "read-only" if needs_home(code) else "yes",
                                         [p for p in HTTP_MAN_PAGES if p in pages])}
    out = {}
    for what, rel in TARGETS.items():
        path = os.path.join(prefix, rel)
        if what == "config" and os.path.exists(path):
            continue
        out[path] = texts[what]
    return out


def write_file(path: str, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename), parents made."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def next_steps(prefix: str) -> list[str]:
    """The commands an administrator runs after installing under ``prefix``."""
    if os.path.abspath(prefix) != "/":
        return ["# installed under a prefix: copy the files into place, then run the commands below",
                "systemd-sysusers", "systemd-tmpfiles --create", "systemctl daemon-reload",
                "systemctl enable --now llmosd"]
    return ["systemd-sysusers", "systemd-tmpfiles --create", "systemctl daemon-reload",
            "systemctl enable --now llmosd",
            "usermod -aG llmos USER    # each user who may use llmctl (log in again after)",
            "systemctl enable --now llmosd-http    # optional: the OpenAI/Ollama HTTP gateway"]


def install(prefix: str = "/", dry_run: bool = False, out=sys.stdout, **kw) -> dict[str, str]:
    """Write (or with ``dry_run`` only show) the files of ``plan``; print what and the next
    commands.  Returns the plan."""
    files = plan(prefix, **kw)
    for path, text in files.items():
        if dry_run:
            print(f"# would write {path}:\n{text}", file=out)
        else:
            write_file(path, text)
            print(f"wrote {path}", file=out)
    config = os.path.join(prefix, TARGETS["config"])
    if config not in files:
        print(f"kept {config} (it exists)", file=out)
    print("next:\n" + "\n".join("  " + c for c in next_steps(prefix)), file=out)
    return files


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llmosd install-service",
        description="Install llmosd as a systemd service: the unit (ExecStart: this installation's "
                    "python -m llmosd --system), its sysusers.d and tmpfiles.d files, and "
                    "/etc/llmosd/llmosd.toml when it is absent.")
    p.add_argument("--prefix", default="/", metavar="DIR", help="install below DIR (default /)")
    p.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    a = p.parse_args(argv)
    try:
        install(a.prefix, a.dry_run)
    except OSError as e:
        print(f"llmosd install-service: {e}\n  hint: run it as root, or give --prefix DIR",
              file=sys.stderr)
        return 73   # EX_CANTCREAT
    return 0
