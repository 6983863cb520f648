"""The control loop: one ROUTER socket, one thread, never blocked by model work.

Other threads hand work in (an engine's chunk, a finished load) through ``post()``, a
thread-safe call queue that wakes the loop through a pipe.  Requests are decoded and checked
here, then passed to the handler (``ops.Ops.dispatch``) as a ``Ctx``; streams use ``Stream``.

Flow control: sends never block.  With ROUTER_MANDATORY, a full pipe (a slow client) raises
EAGAIN and the message waits in that peer's backlog; a vanished peer raises EHOSTUNREACH and
its streams are cancelled.  A client with anything open gets a ``beat`` every ``heartbeat_ms``
when idle, so one that died quietly is noticed.  Request ids are unique among a client's open ones.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
import time
from typing import Callable

import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from llmctl import protocol
from llmctl.errors import BadRequest, ConfigError, Internal, LlmosdError, ShuttingDown, TooLarge
from llmosd.metrics import Metrics

log = logging.getLogger("llmosd.server")


REMOTE_UID = -2        # every tcp (CURVE) client, until keys map to uids
RECV_BATCH = 256       # messages handled per round at most (engine output is not starved)
ZERO_COPY_MIN = 65536  # replies from this size are sent without a copy (pyzmq's copy_threshold)
# plain ints: | and & of pyzmq's enum.Flag constants run Python code on every message
NOBLOCK, EVENTS, POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
SEND_MORE = NOBLOCK | int(zmq.SNDMORE)
CURVE_HINT = ("make the server's keys with 'llmctl keygen --server --dir DIR' and set curve_server_key "
              "and curve_authorized_dir (see llmosd(8)), or use an ipc:// socket")


def audit_refusal(peer: "Peer", mtype: str, body: dict) -> None:
    """The audit trail of refusals (issue 14): a permission_denied answer is logged at INFO with
    the peer's uid and the reason (granted actions are logged by their handlers)."""
    if body.get("name") == "permission_denied":
        who = f"uid {peer.uid}" if peer.uid is not None else "an in-process caller"
        if peer.key:
            who += f" (CURVE key {peer.key[:8]}...)"
        log.info("refused %s by %s: %s", mtype, who, body.get("message", ""))


def send_error(server: "Server", peer: "Peer", rid: int, mtype: str | None, body: dict) -> None:
    """An ``error`` reply to request ``rid``: counted, audited (a refusal), sent."""
    server.count(mtype, body.get("name"))
    audit_refusal(peer, mtype, body)
    server.send(peer, protocol.reply(rid, "error", body))


def key_uids(authorized: str) -> dict[str, int]:
    """Z85 public key -> local uid, for the authorized key files named after a local user
    (``alice.key``, ``alice.anything.key``): such a tcp client acts as that user.  Never root: a
    key named ``root`` stays REMOTE_UID (logged), so no key is a remote superuser.  No links."""
    import pwd
    out = {}
    try:
        names = sorted(os.listdir(authorized))
    except OSError:
        return out
    for name in names:
        path = os.path.join(authorized, name)
        if not name.endswith(".key") or os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            uid = pwd.getpwnam(name[:-len(".key")].split(".")[0]).pw_uid
            public, _ = zmq.auth.load_certificate(path)
        except (KeyError, ValueError, OSError):
            continue
        if uid == 0:
            log.warning("CURVE key %s is named after root: remote clients never act as root; "
                        "it stays an unprivileged remote client", path)
            continue
        out[public.decode()] = uid
    return out


class Peer:
    """One connected client (one DEALER socket), keyed by its ROUTER routing id.

    ipc peers carry their uid/gid/pid (peer credentials).  A tcp peer's identity is ``key``,
    the Z85 CURVE public key the ZAP handler accepted; its ``uid`` is the local user its key
    file is named after (``key_uids``), else REMOTE_UID: unprivileged, neither root nor the
    daemon's (None would be a trusted in-process caller), owning only what it makes."""

    def __init__(self, ident: bytes, address: str | None, key: str | None = None,
                 key_uids: dict | None = None):
        self.ident = ident
        self.uid = self.gid = self.pid = None
        self.key = key or None
        if self.key:
            self.uid = (key_uids or {}).get(self.key, REMOTE_UID)
        parts = (address or "").rsplit(":", 3)     # ipc peers: "...:uid:gid:pid"
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            self.uid, self.gid, self.pid = map(int, parts[1:])
        self.streams: dict[int, Stream] = {}
        self.holds: set = set()     # held outside streams (uploads): the peer stays known, beaten
        self.open_ids: set[int] = set()     # request ids not answered yet (any request type)
        self.backlog: collections.deque = collections.deque()
        self.last_sent = time.monotonic()

    def __repr__(self) -> str:
        if self.pid is not None:
            return f"client(pid={self.pid}, uid={self.uid})"
        return f"client(key={self.key})" if self.key else f"client({self.ident.hex()})"


class Stream:
    """The daemon side of one streamed request: chunks, then one end or error."""

    def __init__(self, server: "Server", peer: Peer, rid: int, on_cancel: Callable[[str], None],
                 mtype: str = ""):
        self.server, self.peer, self.rid, self.on_cancel = server, peer, rid, on_cancel
        self.mtype = mtype            # the request's type, for the metrics
        self.seq, self.closed = 0, False

    def chunk(self, body: dict, on_sent: Callable[[], None] | None = None) -> None:
        if self.closed:
            return
        self.server.send(self.peer, protocol.reply(self.rid, "chunk", body, seq=self.seq), on_sent)
        self.seq += 1

    def end(self, body: dict) -> None:
        if not self.closed:
            self.server.count(self.mtype, "ok", body)
            self.server.send(self.peer, protocol.reply(self.rid, "end", body, seq=self.seq))
            self._close()

    def error(self, err: LlmosdError | dict) -> None:
        if not self.closed:
            send_error(self.server, self.peer, self.rid, self.mtype,
                       err if isinstance(err, dict) else err.to_wire())
            self._close()

    def cancel(self, reason: str) -> None:
        """Ask the producer to stop; it will end or error the stream itself."""
        if not self.closed:
            self.on_cancel(reason)

    def _close(self) -> None:
        self.closed = True
        self.peer.streams.pop(self.rid, None)
        self.peer.open_ids.discard(self.rid)
        self.server.forget_if_idle(self.peer)


class Ctx:
    """One request as seen by a handler."""

    def __init__(self, server: "Server", peer: Peer, msg: dict):
        self.server, self.peer = server, peer
        self.rid, self.type, self.body = msg["id"], msg["type"], msg["body"]

    @property
    def uid(self) -> int | None:
        return self.peer.uid

    def ok(self, body: dict | None = None) -> None:
        self._answered(self.server.send, self.peer, protocol.reply(self.rid, "ok", body))
        self.server.count(self.type, "ok", body)     # after the send: off the reply's path

    def error(self, err: LlmosdError | dict) -> None:
        body = err if isinstance(err, dict) else err.to_wire()
        self._answered(send_error, self.server, self.peer, self.rid, self.type, body)

    def _answered(self, send: Callable, *args) -> None:
        # forget an idle peer only after the send: a reply that waits (EAGAIN) keeps it known
        if self.rid not in self.peer.streams:
            self.peer.open_ids.discard(self.rid)
        send(*args)
        self.server.forget_if_idle(self.peer)

    def stream(self, on_cancel: Callable[[str], None]) -> Stream:
        s = Stream(self.server, self.peer, self.rid, on_cancel, self.type)
        self.peer.streams[self.rid] = s
        return s


class Server:
    def __init__(self, url: str, *, max_message: int, send_hwm: int, heartbeat_ms: int,
                 socket_mode: int = 0o660, curve: tuple[str, str] | None = None):
        """``curve``: (server secret key file, directory of authorized client public keys);
        required for tcp:// (see ``bind``), unused for ipc://."""
        self.curve, self.auth, self.socket_mode = curve, None, socket_mode
        self.key_uids: dict[str, int] = {}      # tcp: public key -> local uid (key_uids)
        self.url, self.max_message = url, max_message
        self.heartbeat = heartbeat_ms / 1000.0
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        # No ZMTP heartbeats: dropping a paused reader on a heartbeat timeout trips a libzmq
        # assertion in the client (libzmq #3596/#3937).  Liveness is `beat` replies, whose failed
        # delivery (EHOSTUNREACH) says the client is gone, and TCP keepalives for a dead host.
        for opt, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, send_hwm), (zmq.RCVHWM, send_hwm),
                           (zmq.LINGER, 1000), (zmq.MAXMSGSIZE, max_message + (1 << 20)),
                           (zmq.TCP_KEEPALIVE, 1), (zmq.TCP_KEEPALIVE_IDLE, 30),
                           (zmq.TCP_KEEPALIVE_INTVL, 10)):
            self.sock.setsockopt(opt, value)
        self.peers: dict[bytes, Peer] = {}
        self._calls: collections.deque = collections.deque()
        # post() vs close(): no write to a closed (maybe reused) fd; an RLock for signal handlers
        self._wake_lock, self._closed = threading.RLock(), False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.handler: Callable[[Ctx], None] | None = None
        self.stopping = self.stop_requested = False
        self.idle_checks: list[Callable[[], bool]] = []   # shutdown waits until all are True
        self.on_peer_gone: list[Callable[[Peer], None]] = []   # run when a client disconnects
        self.metrics = Metrics()      # requests by type and result; gauges bound by ``ops``

    # -- setup --------------------------------------------------------------------------------
    def bind(self) -> None:
        if self.url.startswith("tcp://"):
            self._curve_server()
        if not self.url.startswith("ipc://"):
            self.sock.bind(self.url)
            return
        old = os.umask(0o777 & ~self.socket_mode)   # the socket is born with socket_mode
        try:
            self.sock.bind(self.url)
        finally:
            os.umask(old)
        os.chmod(self.url[len("ipc://"):], self.socket_mode)

    def _curve_server(self) -> None:
        """tcp:// is CURVE only: our key pair on the socket, and a ZAP handler that admits the
        public keys found in the authorized directory (read once, at start)."""
        if not self.curve:
            raise ConfigError(f"{self.url} needs CURVE keys", hint=CURVE_HINT)
        secret_file, authorized = self.curve
        public, secret = load_server_keys(secret_file)
        self.auth = RefusalLoggingAuthenticator(self.ctx, log=logging.getLogger("llmosd.zap"))
        self.auth.start()
        self.auth.configure_curve(domain="*", location=authorized)
        self.sock.curve_secretkey, self.sock.curve_publickey = secret, public
        self.sock.curve_server = True
        self.key_uids = key_uids(authorized)
        log.info("tcp with CURVE: %d authorized client key(s) in %s (%d named after a local user)",
                 len(self.auth.certs.get("*", {})), authorized, len(self.key_uids))

    # -- cross-thread ----------------------------------------------------------------------
    def post(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the loop thread soon.  Safe from any thread and signal handlers.
        After ``close`` a silent no-op: the process is exiting (an engine may still post)."""
        self._wake((fn, args))

    def request_stop(self) -> None:
        self.stop_requested = True
        self._wake(None)

    def _wake(self, call: tuple | None) -> None:
        with self._wake_lock:
            if self._closed:
                return
            if call is not None:
                self._calls.append(call)
            with contextlib.suppress(BlockingIOError):   # a full pipe: the loop is due to wake
                os.write(self._wake_w, b"\0")

    # -- sending ------------------------------------------------------------------------------
    def send(self, peer: Peer, msg: dict, on_sent: Callable[[], None] | None = None) -> None:
        data = protocol.encode(msg)
        if len(data) > self.max_message:     # the client would drop it as too large
            err = TooLarge(f"the reply to request {msg['id']} would be {len(data)} bytes, more "
                           f"than the {self.max_message}-byte message limit",
                           hint="ask for less at once (shorter text, fewer inputs)")
            data = protocol.encode(protocol.reply(msg["id"], "error", err.to_wire()))
        if peer.backlog or self._try_send(peer, data, on_sent) == "again":
            peer.backlog.append((data, on_sent))

    def _try_send(self, peer: Peer, data: bytes, on_sent) -> str:
        """'sent', 'again' (the peer's pipe is full) or 'gone' (the peer disconnected)."""
        try:
            # send_multipart's checks cost more than a small reply's send; a refusal comes at
            # the routing frame, before anything is queued.  Zero-copy pays only when large.
            self.sock.send(peer.ident, SEND_MORE)
            self.sock.send(data, NOBLOCK, copy=len(data) < ZERO_COPY_MIN)
        except zmq.ZMQError as e:
            if e.errno == errno.EAGAIN:
                return "again"
            if e.errno == errno.EHOSTUNREACH:
                self.peer_gone(peer)
                return "gone"
            raise
        peer.last_sent = time.monotonic()
        if on_sent:
            on_sent()
        return "sent"

    def _pump_backlogs(self) -> None:
        for peer in list(self.peers.values()):
            while peer.backlog and self._try_send(peer, *peer.backlog[0]) == "sent":
                peer.backlog.popleft()
            self.forget_if_idle(peer)

    def peer_gone(self, peer: Peer) -> None:
        if self.peers.pop(peer.ident, None) is None:
            return
        peer.backlog.clear()
        if peer.streams:
            log.info("%r went away; cancelling %d stream(s)", peer, len(peer.streams))
        for s in list(peer.streams.values()):
            s.closed = True       # nothing more can be delivered
            self.count(s.mtype, "disconnected")
            s.on_cancel("client disconnected")
        peer.streams.clear()
        for hook in self.on_peer_gone:
            try:
                hook(peer)
            except Exception:
                log.exception("peer-gone hook failed")
        peer.holds.clear()

    def count(self, mtype, result, body: dict | None = None) -> None:
        """One request answered (``result``: ok, an error name, disconnected), for the metrics;
        never raises: a metric is not worth a lost reply."""
        try:
            self.metrics.reply(mtype, result, body)
        except Exception:
            log.exception("counting a reply failed")

    def forget_if_idle(self, peer: Peer) -> None:
        if not peer.streams and not peer.backlog and not peer.holds and not peer.open_ids:
            self.peers.pop(peer.ident, None)

    def _beats(self) -> None:
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if ((peer.streams or peer.holds or peer.open_ids) and not peer.backlog
                    and now - peer.last_sent >= self.heartbeat):
                self.send(peer, protocol.reply(0, "beat"))

    # -- receiving ----------------------------------------------------------------------------
    def _receive(self) -> None:
        """Handle the queued messages, up to RECV_BATCH; called when the poll found the socket
        readable.  EVENTS says whether one more waits: cheaper than a recv failing (EAGAIN)."""
        sock = self.sock
        for _ in range(RECV_BATCH):
            frames = self._recv_message()
            if frames is None:
                return
            ident = frames[0].bytes
            peer = self.peers.get(ident)
            if peer is None:
                key = _prop(frames, "User-Id") if self.auth else None
                peer = Peer(ident, _prop(frames, "Peer-Address"), key, self.key_uids)
                self.peers[ident] = peer
            self._handle(peer, frames[1:])
            self.forget_if_idle(peer)
            if not sock.getsockopt(EVENTS) & POLLIN:
                return

    def _recv_message(self) -> list | None:
        """The next message's frames (routing id first), or None.  ``Frame.more``: no socket
        option read per part (recv_multipart's way); a message arrives whole."""
        try:
            frames = [self.sock.recv(NOBLOCK, copy=False)]
        except zmq.Again:
            return None
        while frames[-1].more:
            frames.append(self.sock.recv(NOBLOCK, copy=False))
        return frames

    def _handle(self, peer: Peer, frames) -> None:
        rid, mtype = 0, None
        try:
            if len(frames) != 1:
                raise BadRequest(f"a message must be exactly one frame, got {len(frames)}")
            msg = protocol.decode(frames[0].bytes, self.max_message)
            rid, mtype = msg["id"], msg["type"]
            protocol.check_request(msg)
            if self.stopping and msg["type"] not in ("cancel", "ping", "hello"):
                raise ShuttingDown("llmosd is shutting down")
            if rid in peer.open_ids:
                raise BadRequest(f"request id {rid} is already in use by an unanswered request",
                                 hint="use a new id for every request on a connection")
            peer.open_ids.add(rid)
            try:
                self.handler(Ctx(self, peer, msg))
            except BaseException:
                if rid not in peer.streams:
                    peer.open_ids.discard(rid)
                raise
        except LlmosdError as e:
            rid = getattr(e, "rid", rid)
            log.debug("request %s from %r refused: %s", rid, peer, e)
            send_error(self, peer, rid, mtype, e.to_wire())
        except Exception as e:
            log.exception("handler failed")
            send_error(self, peer, rid, mtype, Internal(f"internal error: {e}").to_wire())

    def _run_calls(self, woken: bool = True) -> None:
        """Run the posted calls; ``woken``: the pipe is readable, empty it first (else no read:
        a syscall and an exception).  A call posted meanwhile has its byte wake the next round."""
        if woken:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
        while self._calls:
            fn, args = self._calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("posted call %s failed", getattr(fn, "__qualname__", fn))

    # -- the loop -------------------------------------------------------------------------------
    def run(self, on_stop: Callable[[], None], grace: float) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        deadline, last_beat = None, time.monotonic()
        while True:
            backlog = bool(self.peers) and any(p.backlog for p in self.peers.values())
            timeout = 10 if backlog else int(self.heartbeat * 1000 / 2) or 1
            ready = dict(poller.poll(timeout))     # the socket and/or the wake pipe's fd
            self._run_calls(self._wake_r in ready)
            if self.sock in ready and not self.stopping:
                self._receive()
            self._pump_backlogs()
            if time.monotonic() - last_beat >= self.heartbeat / 2:
                self._beats()
                last_beat = time.monotonic()
            if self.stop_requested and not self.stopping:
                self.stopping = True
                deadline = time.monotonic() + grace
                on_stop()
            if self.stopping:
                done = all(check() for check in self.idle_checks)
                flushed = not any(p.backlog for p in self.peers.values())
                if (done and flushed) or time.monotonic() > deadline:
                    if not done:
                        log.warning("shutdown grace of %.1fs ran out; exiting anyway", grace)
                    return

    def close(self) -> None:
        with self._wake_lock:      # from here on post() drops its call: no write to a closed fd
            self._closed = True
        self.sock.close(linger=1000)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        if self.url.startswith("ipc://"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.url[len("ipc://"):])
        os.close(self._wake_r)
        os.close(self._wake_w)


def _prop(frames: list, name: str) -> str | None:
    """A property of a new peer's first message frame (``Peer-Address``, ``User-Id``), or None."""
    try:
        return frames[1].get(name) if len(frames) > 1 else None
    except zmq.ZMQError:
        return None


def load_server_keys(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``zmq.auth`` secret key file; ConfigError naming the file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the CURVE server key {path}: {e}", hint=CURVE_HINT) from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key (a .key_secret file is needed)", hint=CURVE_HINT)
    return public, secret


class RefusalLoggingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, logging every refused CURVE key at WARNING (once a minute per key
    and address: a refused client retries its handshake every few hundred ms)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._address, self._logged = "", {}

    async def handle_zap_message(self, msg):
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain, client_key):
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            key = z85.encode(client_key).decode()
            now, seen = time.monotonic(), (key, self._address)
            if now - self._logged.get(seen, -1e9) >= 60:
                self._logged[seen] = now
                log.warning("refused a tcp client from %s: CURVE key %s is not authorized (%s)",
                            self._address or "?", key, reason.decode("utf-8", "replace"))
        return allowed, reason
