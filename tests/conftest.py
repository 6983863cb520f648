"""Shared fixtures: a real llmosd subprocess on a temporary socket and state directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TINY = ["--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads", "2", "--vocab-size", "512"]


def train_bpe(vocab_size: int = 400):
    """A byte-level BPE tokenizer (``tokenizers``) trained on Shakespeare, with three ChatML
    special tokens at ids 0..2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(SHAKESPEARE.read_text()[:100_000].splitlines(), trainer)
    return tk


class Daemon:
    """One llmosd process.  ``cli()`` runs llmctl against it; ``client()`` gives a Client."""

    def __init__(self, base: Path, env: dict | None = None):
        self.base = base
        self.rundir = base / "run"
        self.sock = f"ipc://{self.rundir}/llmosd.sock"
        self.state = base / "state"
        self.env = {**os.environ, "LLMOSD_SOCKET": self.sock, "LLMOSD_THREADS": "1",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("LLMOSD_CONFIG", None)
        self.proc: subprocess.Popen | None = None
        self.log = base / "llmosd.log"

    def start(self, *extra: str, wait: bool = True) -> "Daemon":
        self.base.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmosd", "--socket", self.sock, "--state-dir", str(self.state),
             "--config", "/dev/null", "--log-level", "debug", *extra],
            stdout=self._logf, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        from llmctl import Client
        from llmctl.errors import DaemonUnavailable
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmosd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with Client(self.sock, connect_timeout=1.0) as c:
                    c.ping()
                return
            except DaemonUnavailable:
                time.sleep(0.1)
        raise RuntimeError("llmosd did not become ready:\n" + self.log.read_text())

    def client(self, **kw):
        from llmctl import Client
        return Client(self.sock, **kw).connect()

    def cli(self, *args: str, input: str | bytes | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "llmctl.cli", *args], input=input,
                           capture_output=True, env=self.env, timeout=timeout,
                           text=not isinstance(input, bytes))
        if check and r.returncode != 0:
            raise AssertionError(f"llmctl {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._logf.close()

    def kill9(self) -> None:
        """SIGKILL the daemon alone (its workers must die by themselves)."""
        self.proc.kill()
        self.proc.wait()
        self._logf.close()


def assert_refused_store_unchanged(daemon: Daemon, args: tuple, needle: str, code: int = 65) -> None:
    """Run llmctl ARGS: it must fail with exit ``code`` and ``needle`` in its message, and leave
    the store (manifests, blobs, temp files) exactly as it was."""
    root = daemon.state / "store"

    def files():
        return sorted(os.listdir(root / "blobs")), sorted(os.listdir(root / "tmp"))
    before_ls, before = daemon.cli("ls", "--json").stdout, files()
    r = daemon.cli(*args, check=False)
    assert r.returncode == code and needle in r.stderr, (r.returncode, r.stderr)
    assert daemon.cli("ls", "--json").stdout == before_ls
    assert files() == before


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "d").start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def shared_daemon(tmp_path_factory):
    """One daemon for tests that only read or add models; holds 'tiny' already created."""
    d = Daemon(tmp_path_factory.mktemp("shared")).start()
    d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
    yield d
    d.stop()
