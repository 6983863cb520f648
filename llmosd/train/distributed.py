"""Data parallelism: one rank per process, DistributedDataParallel (gloo on the CPU, nccl on CUDA).

``Solo`` and ``Group`` are the two shapes of a run the trainer sees (rank, world, wrap the model,
all-reduce, broadcast, the stop request); rank r trains on the r-th share of each global batch,
so N ranks of batch b compute what one process of batch N*b does.  The stop request is rank 0's
(the daemon's ctl, or a signal), broadcast to every rank before each step.

``launch`` is the worker's side of ``nproc N`` (training and fine-tuning): it writes a run
directory (spec.json, the data and the parent model as links to their blobs), starts N local ranks of
``python -m llmosd.train.entry RUN_DIR`` with torchrun's environment, relays rank 0's reports
to ``ctl``, turns a pause request into SIGUSR1 for rank 0 and a cancel into killing the ranks,
and returns the final checkpoint rank 0 wrote.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading

import torch
import torch.distributed as dist

PAUSE, CANCEL = "pause", "cancel"
_CODES = {None: 0, PAUSE: 1, CANCEL: 2}
EXIT_PAUSED = 75          # EX_TEMPFAIL: stopped with a checkpoint; run again to resume
EXIT_INVALID = 65         # EX_DATAERR: the spec or the data cannot be trained on
ERROR_PREFIX = "llmosd-train: error: "    # a failing rank's last stderr line: its message


class Solo:
    """A run in one process: every collective is the identity."""
    rank, world, local_rank = 0, 1, 0

    def wrap(self, model, device):
        return model

    def no_sync(self, model, skip: bool):
        return contextlib.nullcontext()

    def all_reduce(self, t):
        return t

    def broadcast_object(self, obj):
        return obj

    def stop(self, ctl):
        return ctl.stop_requested()

    def close(self) -> None:
        pass


class Group(Solo):
    """This process's rank of a torch.distributed group (env:// rendezvous: MASTER_ADDR/PORT)."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))

    def wrap(self, model, device):
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, model, skip: bool):
        """Accumulating micro-steps skip the gradient all-reduce; the last one does it."""
        return model.no_sync() if skip else contextlib.nullcontext()

    def all_reduce(self, t):
        dist.all_reduce(t)
        return t

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self, ctl):
        want = _CODES[ctl.stop_requested()] if self.rank == 0 else 0
        code = torch.tensor([want], device=self.device)
        dist.broadcast(code, 0)
        return {v: k for k, v in _CODES.items()}[int(code.item())]

    def close(self) -> None:
        """Leave the group together: a rank that tears its group down while another still
        writes the pause checkpoint can abort in gloo's threads ("terminate called without an
        active exception"), so the ranks meet at a barrier first (a dead peer fails it fast)."""
        if dist.is_initialized():
            try:
                dist.barrier()
            except Exception:            # noqa: BLE001 - a peer is gone: nothing left to wait for
                pass
            dist.destroy_process_group()


# ---- the worker's launcher -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _link(target: str, path: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


def write_run_dir(run_dir: str, s: dict, store, parent: dict | None) -> None:
    """spec.json, data/<file> (a fine-tune's validation files in val_data/<file>) and parent/
    (meta.json, config.json, tokenizer.bin, model.safetensors) for the ranks; blobs are
    linked, not copied.  meta.json carries what the ranks need of the parent besides its
    blobs: name, digest, tokenizer type and BOS rule, chat template, the weights' digest."""
    for sub, files in (("data", s["data"]), ("val_data", s.get("val_data"))):
        if sub == "data" or files:
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
        for name, digest in (files or {}).items():
            _link(store.blob_path(digest), os.path.join(run_dir, sub, name))
    if parent:
        pdir = os.path.join(run_dir, "parent")
        os.makedirs(pdir, exist_ok=True)
        tok = parent["tokenizer"]
        meta = {"name": parent.get("name"), "digest": parent.get("digest"),
                "tokenizer_type": tok["type"], "add_bos": tok.get("add_bos"),
                "weights_digest": parent["weights"]["digest"]}
        if "chat_template" in parent or "defaults" in parent:
            meta.update(chat_template=parent.get("chat_template"),
                        defaults=dict(parent.get("defaults") or {}))
        with open(os.path.join(pdir, "meta.json"), "w") as f:
            json.dump(meta, f)
        for name, digest in (("config.json", parent["config"]["digest"]),
                             ("tokenizer.bin", tok["digest"]),
                             ("model.safetensors", parent["weights"]["digest"])):
            _link(store.blob_path(digest), os.path.join(pdir, name))
    with open(os.path.join(run_dir, "spec.json"), "w") as f:
        json.dump(s, f, indent=1)


def check_nproc(s: dict) -> None:
    """ValueError when ``nproc`` ranks do not fit the devices: one GPU per CUDA rank."""
    n, dev = s["nproc"], s["device"]
    cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    if cuda and ":" in dev:
        raise ValueError(f"nproc {n} needs one CUDA device per rank; give device cuda (or auto), "
                         f"not {dev}")
    if cuda and n > torch.cuda.device_count():
        raise ValueError(f"nproc {n} is more than the {torch.cuda.device_count()} CUDA device(s) here")
    if not cuda and n > (os.cpu_count() or 1):
        raise ValueError(f"nproc {n} is more than the {os.cpu_count()} CPU cores here")


def _pump(stream, q: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        q.put(line.decode("utf-8", "replace").rstrip("\n"))
    q.put(None)


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def relay(line: str, ctl) -> None:
    """Pass one report line of rank 0 (a JSON object; other lines are log lines) to ``ctl``."""
    try:
        ev = json.loads(line)
    except ValueError:
        ev = None
    if not isinstance(ev, dict):
        ctl.log(line)
    elif "metrics" in ev:
        ctl.metrics(ev["metrics"])
    elif "log" in ev:
        ctl.log(ev["log"])
    elif "progress" in ev:
        ctl.progress(ev["progress"])
    elif "checkpoint" in ev:
        ctl.checkpoint_saved(ev["checkpoint"])


def rank_error(r: int, code: int, log_path: str) -> Exception:
    """What a failed rank means: ValueError (its message) for data or a spec it cannot train
    on, RuntimeError with its log's tail otherwise."""
    tail = _tail(log_path)
    if code == EXIT_INVALID:
        return ValueError(tail.splitlines()[-1].removeprefix(ERROR_PREFIX) if tail else "invalid training input")
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return RuntimeError(f"training rank {r} {how}: {tail}")


def start_ranks(run_dir: str, n: int, ckpt_dir: str) -> list[subprocess.Popen]:
    """N local ranks of the entry point, as torchrun would start them."""
    import llmosd
    root = os.path.dirname(os.path.dirname(os.path.abspath(llmosd.__file__)))
    threads = max(1, torch.get_num_threads() // n)
    base = {**os.environ, "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "LLMOSD_RELAY": "1", "LLMOSD_CHECKPOINT_DIR": ckpt_dir,
            "LLMOSD_TRAIN_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    procs = []
    for r in range(n):
        with open(os.path.join(ckpt_dir, f"rank{r}.log"), "wb") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "llmosd.train.entry", run_dir],
                env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL, stderr=err,
                preexec_fn=_die_with_parent))
    return procs


def launch(s: dict, store, parent: dict | None, ctl) -> tuple[str | None, dict | None]:
    """Train with ``s["nproc"]`` local ranks: (None, the final checkpoint) when done, or
    (PAUSE, None) / (CANCEL, None) when asked to stop.  Raises ValueError (data the ranks
    cannot train on) or RuntimeError (a rank failed)."""
    from llmosd.train import checkpoint
    check_nproc(s)
    run_dir = os.path.join(ctl.job_dir, "run")
    write_run_dir(run_dir, s, store, parent)
    procs = start_ranks(run_dir, s["nproc"], ctl.job_dir)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(procs[0].stdout, q), daemon=True).start()
    eof, ready, pause_sent = False, False, False
    try:
        while True:
            try:
                line = q.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                eof = True
            elif line:
                ready = True            # rank 0 speaks once its signal handlers are in place
                relay(line, ctl)
            stop = ctl.stop_requested()
            if stop == CANCEL:
                return CANCEL, None             # the ranks are killed below: nothing to keep
            if stop == PAUSE and ready and not pause_sent and procs[0].poll() is None:
                procs[0].send_signal(signal.SIGUSR1)
                pause_sent = True
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0, EXIT_PAUSED)]
            if bad:
                raise rank_error(bad[0], codes[bad[0]], os.path.join(ctl.job_dir, f"rank{bad[0]}.log"))
            if eof and None not in codes:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    if procs[0].returncode == EXIT_PAUSED:
        return PAUSE, None
    ck = checkpoint.load(os.path.join(ctl.job_dir, checkpoint.LAST))
    if ck is None or ck["step"] != s["max_steps"]:
        raise RuntimeError("the training ranks ended without their final checkpoint")
    return None, ck
