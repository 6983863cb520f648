"""The client library: one ``Client`` per thread, talking protocol v1 to llmosd.

    from llmctl import Client
    with Client() as c:
        gen = c.generate("tiny", "Once upon", max_tokens=20, temperature=0)
        for text in gen:
            print(text, end="")
        print(gen.stats)

Jobs (train, finetune, eval, merge, jobs, job, job_rm, job_cancel/pause/resume, job_logs)
come from ``llmctl.jobs.JobsMixin``; file uploads from ``llmctl.upload``.
Every daemon error arrives as the matching ``llmctl.errors`` subclass.  A daemon that is not
running raises ``DaemonUnavailable`` within ``connect_timeout`` seconds instead of hanging.
"""
from __future__ import annotations

import itertools
import time
import weakref
from typing import Callable, Iterator

import zmq

from . import curve, protocol
from .access import check_socket_path
from .admin import AdminMixin
from .metrics import MetricsMixin
from .errors import Cancelled, DaemonUnavailable, LlmosdError, Timeout, UnsupportedVersion, from_wire
from .jobs import JobsMixin
from .paths import client_default_socket, ipc_path, normalize_socket
from .upload import RESEND, import_source, upload_file

__all__ = ["Client", "Generation"]

RECV_SLICE_MS = 100     # a reply's wait looks at the connection's monitor this often


class Generation:
    """An in-flight ``generate`` stream: iterate for text pieces; ``stats`` once exhausted.

    ``chunks`` keeps every chunk body (text, token ids, and a first ``loading`` chunk when the
    model had to be loaded) for callers that want more than text.  ``cancel()`` (or ``close()``,
    or leaving a ``with`` block) stops the generation on the daemon; so does dropping the last
    reference to it, and so does the next request on the same Client: a Client reads one
    stream at a time, so a generation left unfinished (``for t in gen: break``) is cancelled
    then, and reading it afterwards raises Cancelled.
    """

    def __init__(self, client: "Client", rid: int, stream: Iterator[dict]):
        self._client, self.id, self._stream = client, rid, stream
        self.stats: dict | None = None
        self.chunks: list[dict] = []
        self._done = False
        self._abandoned = False
        client._track(self)

    def __iter__(self) -> Iterator[str]:
        return self

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_done", True):
            self._client._send_cancel(self.id)

    def __next__(self) -> str:
        if self._abandoned:
            raise Cancelled(f"generation {self.id} was cancelled: another request was made on this "
                            f"Client before it was read to the end",
                            hint="read a Generation to its end first, or use one Client per stream")
        if self._done:
            raise StopIteration
        try:
            chunk = next(self._stream)
        except StopIteration as stop:
            self._done, self.stats = True, stop.value
            raise StopIteration from None
        except BaseException:
            self._done = True
            raise
        self.chunks.append(chunk)
        return chunk.get("text", "")

    def text(self) -> str:
        """Drain the stream and return all of the text."""
        return "".join(list(self))

    def cancel(self, wait: float = 2.0) -> dict | None:
        """Cancel on the daemon and wait up to ``wait`` s for its ``end``; returns final stats."""
        if self._done:
            return self.stats
        self._client._send(protocol.request(next(self._client._ids), "cancel", {"target": self.id}))
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                next(self)
        except StopIteration:
            pass
        except LlmosdError:
            pass
        self._done = True
        return self.stats

    def close(self) -> None:
        """Cancel the generation if it is still running (see ``cancel``)."""
        self.cancel()

    def _abandon(self) -> None:
        """Cancel without waiting for the end (its replies are dropped by the next request)."""
        if not self._done:
            self._client._send_cancel(self.id)
            self._done = self._abandoned = True


class Client(JobsMixin, AdminMixin, MetricsMixin):
    """A connection to llmosd.  Not thread-safe: use one per thread."""

    def __init__(self, socket: str | None = None, *, timeout: float = 60.0,
                 connect_timeout: float = 2.0, stream_idle_timeout: float = 30.0,
                 max_message: int = protocol.DEFAULT_MAX_MESSAGE):
        self.url = normalize_socket(socket) if socket else client_default_socket()
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.max_message = max_message
        self._ids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._rcvtimeo = -1                          # _sock's RCVTIMEO (see _wait_at_most)
        self._open: dict[int, weakref.ref] = {}      # generations that may still be running
        self.daemon_info: dict | None = None

    # -- connection -----------------------------------------------------------------------
    def connect(self) -> "Client":
        if self._sock is not None:
            return self
        path = ipc_path(self.url)
        if path is not None:
            check_socket_path(path)
        tcp_keys = curve.keys_for(self.url)      # tcp: the endpoint checked, then the keys
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        # No ZMTP heartbeats: a reader that pauses stops draining the pipe, its pongs stall, the
        # peer drops the connection on a heartbeat timeout and libzmq asserts (libzmq #3596,
        # #3937).  Liveness is the daemon's application-level beats plus the socket monitor;
        # over TCP the kernel's keepalive notices a vanished host.
        if tcp_keys:
            curve.setup_tcp(s, tcp_keys)    # keepalives, and CURVE: tcp is CURVE only
        s.setsockopt(zmq.MAXMSGSIZE, self.max_message + (1 << 20))
        # Watch the connection itself: a daemon that dies mid-stream is reported at once
        # instead of after stream_idle_timeout.
        self._mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED)
        self._connected_once = False
        try:
            s.connect(self.url)
        except zmq.ZMQError as e:
            s.disable_monitor()
            self._mon.close(linger=0)
            s.close(linger=0)
            raise DaemonUnavailable(f"cannot connect to {self.url!r}: {e}",
                                    hint="--socket / LLMOSD_SOCKET takes a path, unix:///path, "
                                         "ipc:///path or tcp://host:port") from None
        self._sock, self._rcvtimeo = s, -1       # -1: libzmq's RCVTIMEO default (no limit)
        try:
            self.daemon_info = self._call("hello", {"client": "llmctl", "version": protocol.VERSION},
                                          timeout=self.connect_timeout)
        except (Timeout, DaemonUnavailable) as e:
            self.close()
            if self.url.startswith("tcp://"):   # a refused key: silence, or a closed connection
                raise curve.unanswered(self.url, self.connect_timeout) from None
            if isinstance(e, DaemonUnavailable):
                raise
            raise DaemonUnavailable(f"is llmosd running? (no answer on {self.url} within "
                                    f"{self.connect_timeout:g}s)",
                                    hint="start it with 'llmosd', or check --socket / LLMOSD_SOCKET") from None
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._mon.close(linger=0)
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        if self._sock is None:
            self.connect()
        self._sock.send(protocol.encode(msg))

    def _track(self, gen: Generation) -> None:
        self._open[gen.id] = weakref.ref(gen)

    def _cancel_stale(self) -> None:
        """Cancel every generation left unfinished: a new request would drop its replies."""
        if not self._open:          # the usual case, on every request
            return
        for ref in list(self._open.values()):
            gen = ref()
            if gen is not None:
                gen._abandon()
        self._open.clear()

    def _send_cancel(self, rid: int) -> None:
        """Best effort, never blocking or raising (also called from ``Generation.__del__``)."""
        try:
            if self._sock is not None and not self._sock.closed:
                self._sock.send(protocol.encode(protocol.request(next(self._ids), "cancel",
                                                                 {"target": rid})), zmq.NOBLOCK)
        except Exception:   # noqa: BLE001 - at interpreter exit or on a dead socket: nothing to do
            pass

    def _recv(self, rid: int, timeout: float) -> dict:
        """Next reply for request ``rid`` (others, and beats, are dropped) or Timeout.

        Waits in a blocking recv (per reply, cheaper than polling the socket and its monitor
        together) of at most RECV_SLICE_MS at a time; the monitor is read between slices,
        only when no reply has come, so a delivered reply is always read before a
        disconnection is reported (within a slice of it)."""
        deadline = time.monotonic() + timeout
        sock = self._sock
        while True:
            left = deadline - time.monotonic()
            self._wait_at_most(min(RECV_SLICE_MS, int(max(left, 0) * 1000) + 1))
            try:
                data = sock.recv()
            except zmq.Again:
                self._check_monitor()
                if time.monotonic() >= deadline:
                    raise Timeout(f"no reply from llmosd within {timeout:g}s ({self.url})",
                                  hint="the daemon may be overloaded or hung; see its log")
                continue
            msg = protocol.decode(data, max_size=self.max_message + (1 << 20))
            if msg["type"] == "beat" or msg["id"] != rid:
                if msg["type"] == "beat":
                    deadline = max(deadline, time.monotonic() + timeout)
                continue
            return msg

    def _wait_at_most(self, ms: int) -> None:
        """Make a blocking recv on the socket give up after ``ms`` (set only when it changes)."""
        if ms != self._rcvtimeo:
            self._sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms

    def _check_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        while self._mon.poll(0):
            ev = recv_monitor_message(self._mon)["event"]
            if ev == zmq.EVENT_CONNECTED:
                self._connected_once = True
            elif ev == zmq.EVENT_DISCONNECTED and self._connected_once:
                raise DaemonUnavailable(f"llmosd closed the connection ({self.url}); did it stop or crash?",
                                        hint="check the daemon's log, restart it and retry")

    def _call(self, type_: str, body: dict | None = None, timeout: float | None = None) -> dict:
        if self._sock is None and type_ != "hello":
            self.connect()
        self._cancel_stale()
        rid = next(self._ids)
        self._send(protocol.request(rid, type_, body))
        msg = self._recv(rid, self.timeout if timeout is None else timeout)
        if msg["type"] == "error":
            raise from_wire(msg["body"])
        if msg["type"] != "ok":
            raise LlmosdError(f"unexpected reply type {msg['type']!r} to {type_!r}")
        return msg["body"]

    def _stream(self, rid: int) -> Iterator[dict]:
        """Yield chunk bodies of stream ``rid``; the generator's return value is the end body."""
        while True:
            msg = self._recv(rid, self.stream_idle_timeout)
            kind = msg["type"]
            if kind == "chunk":
                yield msg["body"]
            elif kind == "end":
                return msg["body"]
            elif kind == "error":
                raise from_wire(msg["body"])
            else:
                raise LlmosdError(f"unexpected reply type {kind!r} in a stream")

    def _start_stream(self, type_: str, body: dict) -> tuple[int, Iterator[dict]]:
        if self._sock is None:
            self.connect()
        self._cancel_stale()
        rid = next(self._ids)
        self._send(protocol.request(rid, type_, body))
        return rid, self._stream(rid)

    def _run_job(self, type_: str, body: dict, progress: Callable[[dict], None] | None) -> dict:
        """Run a streamed job request; progress chunks go to ``progress``; returns the end body."""
        _, stream = self._start_stream(type_, body)
        while True:
            try:
                chunk = next(stream)
            except StopIteration as stop:
                return stop.value
            if progress:
                progress(chunk)

    # -- operations -------------------------------------------------------------------------
    def ping(self) -> dict:
        return self._call("ping")

    def status(self) -> dict:
        return self._call("status")

    def ps(self) -> list[dict]:
        return self._call("ps")["instances"]

    def ls(self) -> list[dict]:
        return self._call("ls")["models"]

    def show(self, model: str) -> dict:
        return self._call("show", {"model": model})

    def rm(self, model: str, force: bool = False) -> dict:
        """Remove ``model``: {model, digest, freed_bytes, removed}.  A base that adapters or
        classifiers use is refused unless ``force``, which removes them too (``removed``)."""
        return self._call("rm", {"model": model, **({"force": True} if force else {})})

    def tag(self, source: str, target: str, *, force: bool = False) -> dict:
        """Name ``source`` also ``target``; an existing, different ``target`` needs ``force``."""
        return self._call("tag", {"source": source, "target": target, **({"force": True} if force else {})})

    def load(self, model: str, timeout: float | None = None, *, keep_alive: float | None = None,
             priority: int | None = None, pin: bool = False, dtype: str | None = None,
             quant: str | None = None) -> dict:
        """Load ``model`` (its instance row; ``already_loaded`` is true when it was).  Memory
        (1.7): ``keep_alive`` idle seconds (-1 forever), ``priority`` (lower is evicted first),
        ``pin`` (never evicted); 1.9: ``dtype``, ``quant`` (auto|none|int8|int4 weights)."""
        body = _clean({"model": model, "keep_alive": keep_alive, "priority": priority, "pin": pin or None})
        self._require_minor(7, "--keep-alive, --priority and --pin", len(body) > 1)
        body.update(opts := _clean({"dtype": dtype, "quant": quant}))
        self._require_minor(9, "--dtype and --quant", bool(opts))
        return self._call("load", body, timeout=timeout or self._work_timeout)

    def pin(self, target: str | int) -> dict:
        """Pin a model's instances (or instance ``target``): never evicted, never expired."""
        self._require_minor(7, "pin")
        return self._call("pin", {"target": str(target)})

    def unpin(self, target: str | int) -> dict:
        """Undo ``pin``: the instances may be evicted and expire again."""
        self._require_minor(7, "unpin")
        return self._call("unpin", {"target": str(target)})

    def _require_minor(self, minor: int, what: str, needed: bool = True) -> None:
        """Refuse, before sending, what an older daemon does not know (it would only say
        "unknown field")."""
        if needed and self.daemon_info is None:
            self.connect()                     # hello tells the daemon's protocol
        have = (self.daemon_info or {}).get("protocol") or [protocol.VERSION, minor]
        if needed and have[0] == protocol.VERSION and have[1] < minor:
            raise UnsupportedVersion(f"{what} needs protocol 1.{minor}; this llmosd speaks "
                                     f"{have[0]}.{have[1]}", hint="upgrade llmosd")

    def unload(self, target: str | int, force: bool = False) -> dict:
        """{"unloaded": [ids]}: empty when a model named ``target`` was not loaded."""
        return self._call("unload", {"target": str(target), "force": force})

    def create(self, name: str, *, layers: int, dim: int, heads: int, text: str | bytes,
               progress: Callable[[dict], None] | None = None, **opts) -> dict:
        """Create a model with random weights and a tokenizer trained on ``text``.

        ``opts``: kv_heads, vocab_size, seed, hidden_dim, context, rope_theta, tie_embeddings,
        force (replace an existing name).  ``progress`` receives each progress chunk.
        """
        body = {"name": name, "layers": layers, "dim": dim, "heads": heads, "text": text}
        body.update(_clean(opts))
        return self._run_job("create", body, progress)

    # -- imports ----------------------------------------------------------------------------
    def upload_file(self, path: str, progress: Callable[[dict], None] | None = None) -> str:
        """Send one file's content to the daemon's store (skipped if it has it); returns its digest."""
        return upload_file(self, path, progress)

    def import_path(self, path: str, name: str, *, force: bool = False, dtype: str | None = None,
                    base: str | None = None, progress: Callable[[dict], None] | None = None) -> dict:
        """Import a GGUF file or a Hugging Face model directory as ``name``, or, with ``base``,
        a PEFT adapter directory as an adapter of the stored model ``base``: uploads the
        content (skipping what the daemon has), then converts it in a daemon job."""
        from .errors import AlreadyExists, ModelNotFound
        fmt_, paths = import_source(path, base)          # bad paths: said before anything is sent
        if not force:                          # say so before uploading gigabytes
            try:
                self.show(name)
                raise AlreadyExists(f"model {name} already exists",
                                    hint="choose another name, or pass --force to replace it")
            except ModelNotFound:
                pass
        body = {"name": name, "format": fmt_, "force": force, "base": base,
                "dtype": None if fmt_ == "peft" else dtype}
        return self._import_job(_clean(body), paths, progress)

    def _import_job(self, body: dict, paths: dict[str, str],
                    progress: Callable[[dict], None] | None) -> dict:
        """Upload ``paths`` ({name in the import: local file}) and run the import job.

        The daemon answers "have" for a file that a stored model was imported from; when this
        import differs from that one (other dtype or files) it needs the content after all and
        refuses once, remembering to ask for it: then the files are sent and the job retried.
        ``progress`` hears that the job is starting (after the uploads it would be silent)."""
        from .errors import InvalidArgument
        for attempt in (1, 2):
            body["files"] = {rel: self.upload_file(p, progress) for rel, p in paths.items()}
            if progress:
                progress({"stage": "import", "message": f"starting the {body['format'].upper()} "
                                                        f"import of {body['name']} on the daemon"})
            try:
                return self._run_job("import", body, progress)
            except InvalidArgument as e:
                if attempt == 2 or RESEND not in str(e):
                    raise

    def export(self, model: str, dest: str, *, force: bool = False,
               progress: Callable[[dict], None] | None = None) -> dict:
        """Write ``model`` as a Hugging Face directory at ``dest`` (see llmctl.export)."""
        from .export import export_model
        return export_model(self, model, dest, force=force, progress=progress)

    def hf_files(self, model: str) -> dict:
        """``model``'s Hugging Face files as the daemon makes them: {model, digest, files: [{name,
        data} or {name, digest, size} (a blob to ``download``)]}, in the order to write them."""
        return self._call("export", {"model": model}, timeout=self._work_timeout)

    def generate(self, model: str, prompt: str, *, max_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: list[str] | None = None, add_bos: bool | None = None,
                 logprobs: int | None = None, keep_alive: float | None = None) -> Generation:
        """Start generating; returns a ``Generation`` to iterate (loads the model if needed).

        Settings left as None take the model's defaults (from its generation_config or GGUF
        metadata), else the daemon's.  ``logprobs=k`` adds, to each chunk, every token's
        log-probability and its k most likely alternatives.  ``keep_alive`` (1.7): seconds the
        instance stays loaded once idle (-1 forever, 0 unload when this request ends).
        """
        body = {"model": model, "prompt": prompt, "add_bos": add_bos,
                **_gen_opts(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                            logprobs, keep_alive)}
        rid, stream = self._start_stream("generate", _clean(body))
        return Generation(self, rid, stream)

    def chat(self, model: str, messages: list[dict], **opts) -> Generation:
        """Generate the assistant's reply to ``messages`` ([{"role", "content"}, ...]), rendered
        with the model's chat template; stops at its end-of-turn token.  ``opts`` as generate."""
        body = {"model": model, "messages": list(messages), **_gen_opts(**opts)}
        rid, stream = self._start_stream("chat", _clean(body))
        return Generation(self, rid, stream)

    # -- evaluation -------------------------------------------------------------------------
    def score(self, model: str, text: str, *, add_bos: bool | None = None,
              keep_alive: float | None = None) -> dict:
        """Per-token log-probabilities of ``text`` and its perplexity (keep_alive: as generate)."""
        body = {"model": model, "text": text, "add_bos": add_bos, "keep_alive": keep_alive}
        return self._call("score", _clean(body), timeout=self._work_timeout)

    def embed(self, model: str, inputs: list[str], *, pooling: str = "mean", normalize: bool = True,
              keep_alive: float | None = None):
        """A float32 numpy array (len(inputs), dim): one vector per input (see llmctl-embed)."""
        import numpy as np
        body = _clean({"model": model, "pooling": pooling, "normalize": normalize, "keep_alive": keep_alive})
        rows = [np.frombuffer(r["data"], dtype="<f4").reshape(r["count"], r["dim"])
                for r in self._batches("embed", inputs, body)]
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype="<f4")

    def classify(self, model: str, inputs: list[str], labels: list[str] | None = None, *,
                 template: str | None = None, keep_alive: float | None = None) -> list[dict]:
        """Labels for ``inputs``, in input order: [{label, scores, probs}, ...]: a classifier's
        trained head (``labels`` optional), else zero-shot among ``labels``."""
        body = _clean({"model": model, "labels": list(labels) if labels is not None else None,
                       "template": template, "keep_alive": keep_alive})
        return [res for r in self._batches("classify", inputs, body) for res in r["results"]]

    def download(self, digest: str, offset: int, size: int = protocol.UPLOAD_CHUNK) -> dict:
        """Up to ``size`` bytes of a stored model's blob from ``offset``: {data, total}."""
        return self._call("download", {"digest": digest, "offset": offset, "size": size})

    def _batches(self, type_: str, inputs: list[str], body: dict):
        """One reply per BATCH inputs, in order (requests stay well under the message limit)."""
        for i in range(0, len(inputs), BATCH):
            yield self._call(type_, {**body, "inputs": inputs[i:i + BATCH]}, timeout=self._work_timeout)

    @property
    def _work_timeout(self) -> float:
        """Replies that wait for model work (loading, scoring) may take minutes."""
        return max(self.timeout, 600)


BATCH = 64        # inputs per embed/classify request


def _clean(body: dict) -> dict:
    """The body without its unset (None) fields: the daemon applies its defaults to those."""
    return {k: v for k, v in body.items() if v is not None}


def _gen_opts(max_tokens=None, temperature=None, top_k=None, top_p=None, min_p=None,
              repetition_penalty=None, seed=None, stop=None, logprobs=None, keep_alive=None) -> dict:
    return {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "min_p": min_p, "repetition_penalty": repetition_penalty, "seed": seed,
            "stop": list(stop) if stop else None, "logprobs": logprobs, "keep_alive": keep_alive}
