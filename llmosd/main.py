"""``llmosd``: parse flags, build the config, take the lock, bind, serve until SIGTERM."""
from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import threading
import time

import llmosd
from llmctl import paths
from llmctl.errors import EX_CONFIG, ConfigError, LlmosdError
from llmosd import config as config_mod

log = logging.getLogger("llmosd")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="llmosd", description="The llmosd daemon: keeps language models in a model table and "
        "serves llmctl over a ZeroMQ socket.  Runs in the foreground (systemd style).",
        epilog="Settings come from defaults, then the TOML config file, then LLMOSD_* variables "
               "(e.g. LLMOSD_SOCKET, LLMOSD_STATE_DIR, LLMOSD_CONFIG, LLMOSD_DEVICE), then flags. "
               "SIGHUP reloads the config file.  `llmosd install-service --help`: install the "
               "systemd service.  See llmosd(8).")
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: /etc/llmosd/llmosd.toml, "
                   "or ~/.config/llmosd/llmosd.toml in user mode)")
    p.add_argument("--socket", metavar="URL", help="ZeroMQ endpoint, e.g. ipc:///run/llmosd/llmosd.sock")
    p.add_argument("--state-dir", metavar="DIR", help="model store and state directory")
    p.add_argument("--user", action="store_true", default=None,
                   help="user mode: XDG state and runtime directories even as root")
    p.add_argument("--system", action="store_true", default=None,
                   help="system mode whatever the uid: /etc/llmosd/llmosd.toml, /var/lib/llmosd, "
                        "/run/llmosd (the systemd unit passes it)")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    p.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", metavar="T", help="auto, float32, float16 or bfloat16")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (0 = auto)")
    p.add_argument("--budget", action="append", metavar="DEVICE=SIZE",
                   help="memory budget of a device: cpu, cuda0 (cuda1, ...) or host (the swap tier) "
                        "= a size (8GiB) or a percentage of its memory (90%%); repeatable, and "
                        "cpu=8GiB,host=2GiB works too")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("--version", action="version", version=f"llmosd {llmosd.__version__}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install-service"]:
        from llmosd import service
        return service.main(argv[1:])
    a = parse_args(argv)
    flags = {"socket": a.socket, "state_dir": a.state_dir, "user": a.user, "log_level": a.log_level,
             "device": a.device, "dtype": a.dtype, "threads": a.threads, "budget": a.budget,
             "system": a.system}
    try:
        cfg, sources = config_mod.load(a.config, dict(flags))
    except LlmosdError as e:
        print(f"llmosd: {e}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return EX_CONFIG
    if a.print_config:
        sys.stdout.write(config_mod.render(cfg, sources))
        return 0
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        return serve(cfg, reload=lambda: config_mod.load(a.config, dict(flags))[0])
    except LlmosdError as e:
        log.error("%s%s", e, f" (hint: {e.hint})" if e.hint else "")
        return e.exit_status
    except OSError as e:
        log.error("cannot start: %s", e)
        return 71   # EX_OSERR


def import_numpy_without_hugepages() -> None:
    """Import numpy with its ``madvise(MADV_HUGEPAGE)`` of arrays >= 4 MiB off (unless the
    environment says otherwise): the KV pools are numpy calloc so that their pages are
    committed as blocks fill (``llama.lazy_zeros``); as huge pages, each first write to a
    block commits 2 MiB: 8 clients x 64 tokens took 152 MiB of RSS instead of 30.  The
    variable (read at numpy's import) is not passed on to job workers."""
    if "numpy" in sys.modules or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["NUMPY_MADVISE_HUGEPAGE"]


def serve(cfg, reload=None) -> int:
    """Run the daemon on ``cfg`` until SIGTERM; ``reload()`` (SIGHUP) reads the config again."""
    from llmosd.jobs.records import Records
    from llmosd.store.store import Store
    from llmosd.system import PidLock, Watchdog, sd_notify

    signal.signal(signal.SIGHUP, signal.SIG_IGN)     # not fatal before the loop can reload
    curve = curve_keys(cfg)                     # tcp:// only with CURVE keys (before torch)
    watchdog = Watchdog.from_env()                  # pings through start-up (TimeoutStartSec)
    if watchdog:
        watchdog.start()
    raise_fd_limit()
    sock_path = paths.ipc_path(cfg.socket)
    if sock_path:
        prepare_dir(os.path.dirname(sock_path), "socket directory",
                    hint="choose another --socket" + ("" if os.environ.get("XDG_RUNTIME_DIR") else
                                                      ", or set XDG_RUNTIME_DIR"))
    prepare_dir(cfg.state_dir, "state directory", hint="choose another --state-dir")
    state_lock = PidLock(os.path.join(cfg.state_dir, "llmosd.lock")).acquire()
    sock_lock = PidLock(sock_path + ".lock").acquire() if sock_path else None
    server = None
    try:
        records = Records(os.path.join(cfg.state_dir, "jobs"))
        loaded = records.load()                 # before recovery: jobs keep their data blobs
        store = Store(os.path.join(cfg.state_dir, "store"))
        store.extra_refs = lambda: frozenset(r for j in loaded for r in j.refs)
        rec = store.recover()
        if any(rec.values()):
            log.info("store recovery: removed %d temp file(s), %d orphan blob(s), %d stray link(s)",
                     rec["temp_files"], rec["orphan_blobs"], rec["links"])
        # torch is imported only now, so --help, --print-config and refusals to start stay fast.
        import_numpy_without_hugepages()
        import torch

        from llmosd.serve.instances import InstanceManager
        from llmosd.jobs.runner import JobRunner
        from llmosd.mem.devices import resolve_device, resolve_dtype
        from llmosd.ops import Ops
        from llmosd.server import Server
        from llmosd.store.uploads import Uploads
        from llmosd.store.writer import StoreWriter

        threads = cfg.torch_threads()
        torch.set_num_threads(threads)
        from llmosd.models import quant
        quant.set_compile(cfg.compile)        # before any load: the kernels are chosen once
        from llmosd.models import qkernels
        qkernels.set_int8_activations(cfg.activations == "int8")
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        server = Server(cfg.socket, max_message=cfg.max_message_bytes, send_hwm=cfg.send_hwm,
                        heartbeat_ms=cfg.heartbeat_ms, socket_mode=cfg.socket_mode, curve=curve)
        store.writer = StoreWriter(server.post)    # manifest, rm and tag writes (fsync) off the loop
        # one memory manager (issue 12): budgets in bytes; both admissions see each other's holders
        import inspect
        memory = memory_manager(cfg)
        manager = InstanceManager(server.post, store, device, dtype, max_batch=cfg.max_batch,
                                  stream_buffer=cfg.stream_buffer, max_kv_bytes=cfg.max_kv_bytes,
                                  memory=memory, keep_alive=cfg.keep_alive)
        job_kw = {"memory": memory} if "memory" in inspect.signature(JobRunner).parameters else {}
        jobs = JobRunner(server.post, store.root, records, threads, max_jobs=cfg.max_jobs,
                         stop_timeout=cfg.job_stop_timeout_s, jobs=loaded, write=store.writer.submit,
                         **job_kw)
        if callable(getattr(jobs, "holders", None)):
            manager.job_holders = jobs.holders
        if callable(getattr(jobs, "preempt", None)):
            manager.preempt_job = jobs.preempt
        if callable(getattr(jobs, "use_instances", None)):
            jobs.use_instances(manager.instance_holders, manager.make_room,
                               host_pending=manager.place.host_pending)
        store.extra_refs = jobs.refs
        uploads = Uploads(store, server.post)
        ops = Ops(cfg, store, manager, jobs, uploads)
        server.handler = ops.dispatch
        ops.attach(server)                      # metrics, and their HTTP port if configured
        server.on_peer_gone.append(ops.peer_gone)
        server.idle_checks += [manager.idle, jobs.idle, store.writer.idle]
        server.bind()
        manager.start_timer()                   # keep-alives
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.request_stop())
        reloader = Reloader(cfg, reload, manager=manager, jobs=jobs, uploads=uploads)
        signal.signal(signal.SIGHUP, lambda *_: server.post(reloader.reload))
        log.info("llmosd %s listening on %s (state %s, device %s, %s, %d thread(s))",
                 llmosd.__version__, cfg.socket, cfg.state_dir, device,
                 str(dtype).replace("torch.", ""), threads)
        from llmosd import desired
        desired.restore(manager, store, os.path.join(cfg.state_dir, desired.FILE))   # the table as it was
        ops.job_ops.adopt()                     # train jobs from the records resume

        def status() -> str:                    # the STATUS= line, made on the loop
            return daemon_status(cfg, server, manager, jobs, reloader)

        def notify(state: str) -> None:         # READY=1, STOPPING=1: with the status line
            text = status()
            sd_notify(f"{state}\nSTATUS={text}")
            if watchdog:
                watchdog.sent_status(text)
        # READY=1 from the loop's first round: bound and running, so the socket answers
        server.post(notify, f"READY=1\nMAINPID={os.getpid()}")
        if watchdog:
            watchdog.attach(server.post, status)

        def on_stop():
            log.info("stopping: cancelling requests, pausing train jobs, unloading models")
            notify("STOPPING=1")
            ops.shutdown()
        server.run(on_stop, cfg.shutdown_grace_s)
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if watchdog:
            watchdog.stop()
        if server is not None:
            server.close()
        if sock_lock:
            sock_lock.release()
        state_lock.release(remove=False)
    stuck = wait_for_workers(cfg.shutdown_grace_s + 5.0)
    if stuck:
        # Exiting the interpreter while a thread is inside torch makes the C++ runtime abort
        # ("terminate called without an active exception", status 134): leave without it.
        log.warning("stopped; %s still busy in a forward pass, exiting without waiting",
                    ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    log.info("stopped")
    return 0


def daemon_status(cfg, server, manager, jobs, reloader) -> str:
    """The STATUS= line: what the daemon does now (run on the control loop)."""
    running = sum(1 for j in jobs.jobs.values() if getattr(j.state, "value", j.state) == "running")
    what = "stopping" if server.stopping else f"listening on {cfg.socket}"
    line = f"{what}; {len(manager.table)} instance(s), {running} job(s) running"
    return line + (f"; config reload refused: {reloader.refused}" if reloader.refused else "")


class Reloader:
    """SIGHUP: read the config again (same file, environment and flags: ``load()``) and apply
    the keys that can change at runtime (``config.RELOADABLE``) to the running parts, on the
    control loop; clients and their streams are untouched.  A file that does not load is
    refused (logged at ERROR with its line and key, and in STATUS=) and the running config
    stays.  Changed keys that need a restart are logged and not applied."""

    def __init__(self, cfg, load, *, manager, jobs, uploads):
        self.cfg, self.load = cfg, load
        self.manager, self.jobs, self.uploads = manager, jobs, uploads
        self.refused = ""                       # the last refusal, until a reload succeeds

    def reload(self) -> None:
        from llmosd.system import sd_notify
        if self.load is None:
            return
        try:
            new = self.load()
        except LlmosdError as e:
            self.refused = " ".join(str(e).split())
            log.error("config reload refused, the running config stays: %s%s", e,
                      f" (hint: {e.hint})" if e.hint else "")
            sd_notify(f"STATUS=config reload refused: {self.refused}")
            return
        self.refused = ""
        apply, restart = config_mod.reload_changes(self.cfg, new)
        for key, (old, value) in apply.items():
            self.apply(key, value)
            setattr(self.cfg, key, value)       # ops reads the same Config (default_max_tokens)
        for key, (old, value) in restart.items():
            log.warning("config reload: %s changed (%r -> %r) but applies only after a restart",
                        key, old, value)
        log.info("config reloaded from %s: %s", new.config_file or "(no file)",
                 ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in apply.items()) or "nothing to apply")

    def apply(self, key: str, value) -> None:
        """Put one RELOADABLE setting into effect."""
        m, j, u = self.manager, self.jobs, self.uploads
        if key == "log_level":
            logging.getLogger().setLevel(value.upper())
        elif key == "keep_alive":               # the default of instances loaded from now on
            m.place.keep_alive = value
        elif key in ("max_batch", "stream_buffer"):   # engines started from now on
            setattr(m, key, value)
        elif key == "max_uploads":
            u.max_open = value
        elif key == "max_uploads_per_client":
            u.max_per_owner = value
        elif key == "max_kv_bytes":             # the pools of instances loaded from now on
            m.kv.limit = max(0, value)          # 0: auto (placement.pool_blocks)
        elif key == "max_jobs":
            j.max_jobs = value
            j.schedule()
        elif key == "job_stop_timeout_s":
            j.stop_timeout = value
        # admin_group, shared_inference, quotas: the handlers read the shared Config on each
        # request, so setting it (reload()) is all; max_prefill_tokens, max_waiting: the same
        # for engines started from now on


def curve_keys(cfg) -> tuple[str, str] | None:
    """For a tcp:// socket, (server secret key file, authorized client keys directory): the
    config's, else <config dir>/curve/server.key_secret and <config dir>/curve/authorized.
    ConfigError (exit 78) naming the fix when the key does not load or no client key is
    authorized: tcp is never served without CURVE.  None for ipc:// (no CURVE there)."""
    if not cfg.socket.startswith("tcp://"):
        return None
    from llmosd.server import load_server_keys
    base = os.path.join(os.path.dirname(cfg.config_file or config_mod.default_config_file(
        cfg.user, cfg.system)), "curve")
    secret = cfg.curve_server_key or os.path.join(base, "server.key_secret")
    authorized = cfg.curve_authorized_dir or os.path.join(base, "authorized")
    fix = (f"run 'llmctl keygen --server --dir {os.path.dirname(secret)}' and copy each client's "
           f"public key (from 'llmctl keygen') into {authorized}/, or set curve_server_key and "
           "curve_authorized_dir, or use an ipc:// socket")
    if not os.path.isfile(secret):
        raise ConfigError(f"{cfg.socket} is a tcp socket, which llmosd serves only with CURVE keys, "
                          f"and the server's secret key {secret} does not exist", hint=fix)
    load_server_keys(secret)
    try:
        keys = [n for n in os.listdir(authorized) if n.endswith(".key")]
    except OSError as e:
        raise ConfigError(f"{cfg.socket} is a tcp socket and needs authorized client keys, but "
                          f"{authorized} cannot be read: {e.strerror}", hint=fix) from None
    if not keys:
        raise ConfigError(f"{cfg.socket} is a tcp socket and no client key is authorized: "
                          f"{authorized} holds no *.key file", hint=fix)
    return secret, authorized


def memory_manager(cfg):
    """The daemon's one memory manager (issue 12), its budgets logged: the cpu's, one for
    every CUDA device torch sees (``torch.cuda.device_count()``: each GPU gets a budget, not
    only the first) and the host tier's, from ``cfg`` (``mem.budgets``).  Imports torch."""
    import torch

    from llmosd.mem import devices
    from llmosd.mem.manager import MemoryManager, budgets_from_config
    from llmosd.mem.policy import size_text
    budgets, host = budgets_from_config(cfg, lambda d: devices.device_memory(torch.device(d)),
                                        devices.device_memory(torch.device("cpu")),
                                        torch.cuda.device_count())
    log.info("memory budgets: %s; host tier %s", ", ".join(f"{d} {size_text(n)}" for d, n in
                                                          budgets.items()), size_text(host) if host else "off")
    return MemoryManager(budgets, host)


def make_dirs(path: str, mode: int = 0o750) -> list[str]:
    """Create directory ``path`` and its missing parents (parents as os.makedirs would);
    return the directories this call created, outermost first.  One that appears meanwhile
    (made by someone else) is not in the list."""
    missing, p = [], os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d, mode if d == missing[0] else 0o777)
        except FileExistsError:
            continue
        created.append(d)
    return created


def prepare_dir(path: str, what: str, hint: str) -> None:
    """Make sure ``path`` is a directory the daemon may use: one it creates now gets mode
    0750 whatever the umask; one that was there keeps its mode and must pass
    ``paths.check_private_dir`` (a sticky /tmp-like directory of root's passes: others
    cannot replace our entries in it).  Raises ConfigError naming the directory."""
    path = os.path.abspath(path)
    if path in make_dirs(path):
        os.chmod(path, 0o750)
        return
    problem = paths.check_private_dir(path, os.geteuid(), shared_ok=True)
    if problem:
        raise ConfigError(f"{what} {path} {problem}; llmosd uses only directories it made or "
                          "that no other user can change",
                          hint=f"remove it or fix its owner and mode (e.g. chmod go-w), or {hint}")


def raise_fd_limit(want: int = 65536) -> None:
    """Raise the soft RLIMIT_NOFILE to min(hard, ``want``): running out of descriptors makes
    libzmq abort, so keep that limit far away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(hard, want)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.debug("cannot raise the descriptor limit from %d: %s", soft, e)
            return
        log.debug("descriptor limit raised from %d to %d", soft, target)


def wait_for_workers(timeout: float, prefixes: tuple = ("engine-", "load-")) -> list[str]:
    """Join the threads whose names start with ``prefixes`` (engines and loaders, which run
    torch) for up to ``timeout`` seconds in all; return the names of those still alive."""
    deadline = time.monotonic() + timeout
    workers = [t for t in threading.enumerate()
               if t.name.startswith(prefixes) and t is not threading.current_thread()]
    for t in workers:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in workers if t.is_alive()]
