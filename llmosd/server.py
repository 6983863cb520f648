"""The control loop: one ROUTER socket, one thread, never blocked by model work.

Everything other threads want done (an engine's chunk, a finished load, a job's progress) is
handed in through ``post()``, a thread-safe call queue that wakes the loop through a pipe.
Requests are decoded and checked here, then passed to the handler (``ops.Ops.dispatch``) as a
``Ctx``; streamed replies go out through ``Stream``.

Flow control: sends never block.  With ROUTER_MANDATORY, a full pipe (the client is slow)
raises EAGAIN and the message waits in that peer's backlog; a vanished peer raises EHOSTUNREACH
and all its streams are cancelled.  A client with anything open (streams, unanswered requests,
uploads) gets a ``beat`` every ``heartbeat_ms`` when idle, so one that died quietly is noticed
within about one beat.  A request id is unique among a client's unanswered requests.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import time
from typing import Callable

import zmq
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


def audit_refusal(peer: "Peer", mtype: str, body: dict) -> None:
    """The audit trail of refusals (issue 14): a permission_denied answer is logged at INFO
    with the peer's uid and the reason, as every granted store change, load and job action is
    by its handler."""
    if body.get("name") == "permission_denied":
        who = f"uid {peer.uid}" if peer.uid is not None else "an in-process caller"
        if peer.key:
            who += f" (CURVE key {peer.key[:8]}...)"
        log.info("refused %s by %s: %s", mtype, who, body.get("message", ""))


def key_uids(authorized: str) -> dict[str, int]:
    """Z85 public key -> local uid, for the authorized key files named after a local user
    (``alice.key``, or ``alice.anything.key``): such a tcp client acts as that user (owns what
    it makes, may act on what that user owns).  Never root: a remote key named ``root`` stays
    REMOTE_UID (logged), so no key on disk is a remote superuser.  Links are not followed."""
    import pwd
    import zmq.auth
    out = {}
    try:
        names = sorted(os.listdir(authorized))
    except OSError:
        return out
    for name in names:
        path = os.path.join(authorized, name)
        if not name.endswith(".key") or os.path.islink(path) or not os.path.isfile(path):
            continue
        user = name[:-len(".key")].split(".")[0]
        try:
            uid = pwd.getpwnam(user).pw_uid
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

    ipc peers carry their uid/gid/pid (peer credentials).  tcp peers have none: their
    identity is ``key``, the Z85 CURVE public key the ZAP handler accepted (its User-Id).
    Their ``uid`` is the local user their key file is named after (``key_uids``: the
    administrator's ``alice.key`` acts as alice), else REMOTE_UID: an unprivileged user that is
    neither root nor the daemon's (uid None would count as a trusted in-process caller), so
    remote clients own what they make and may touch nothing of a local user's."""

    def __init__(self, ident: bytes, address: str | None, key: str | None = None,
                 key_uids: dict | None = None):
        self.ident = ident
        self.uid = self.gid = self.pid = None
        self.key = key or None
        if self.key:
            self.uid = (key_uids or {}).get(self.key, REMOTE_UID)
        if address:   # ipc peers: "...:uid:gid:pid"
            parts = address.rsplit(":", 3)
            if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit() and parts[3].isdigit():
                self.uid, self.gid, self.pid = int(parts[1]), int(parts[2]), int(parts[3])
        self.streams: dict[int, Stream] = {}
        # Things held for this client outside streams (e.g. open uploads): while non-empty the
        # peer stays known and gets beats, so its disconnection is noticed and they are freed.
        self.holds: set = set()
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
        self.server, self.peer, self.rid = server, peer, rid
        self.on_cancel = on_cancel
        self.mtype = mtype            # the request's type, for the metrics
        self.seq = 0
        self.closed = False

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
            body = err if isinstance(err, dict) else err.to_wire()
            self.server.count(self.mtype, body.get("name"))
            audit_refusal(self.peer, self.mtype, body)
            self.server.send(self.peer, protocol.reply(self.rid, "error", body))
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
        self._answered()
        self.server.send(self.peer, protocol.reply(self.rid, "ok", body))
        self.server.count(self.type, "ok", body)     # after the send: off the reply's path

    def error(self, err: LlmosdError | dict) -> None:
        self._answered()
        body = err if isinstance(err, dict) else err.to_wire()
        self.server.count(self.type, body.get("name"))
        audit_refusal(self.peer, self.type, body)
        self.server.send(self.peer, protocol.reply(self.rid, "error", body))

    def _answered(self) -> None:
        if self.rid not in self.peer.streams:
            self.peer.open_ids.discard(self.rid)
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
        self.curve, self.auth = curve, None
        self.key_uids: dict[str, int] = {}      # tcp: public key -> local uid (key_uids)
        self.url, self.max_message = url, max_message
        self.heartbeat = heartbeat_ms / 1000.0
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, send_hwm)
        self.sock.setsockopt(zmq.RCVHWM, send_hwm)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message + (1 << 20))
        # No ZMTP heartbeats: a client whose reader pauses would be dropped on a heartbeat
        # timeout, and that path trips a libzmq assertion in the client (libzmq #3596/#3937).
        # Liveness is ours instead: `beat` replies, whose failed delivery (EHOSTUNREACH) says
        # the client is gone.  TCP peers get keepalives so a dead host is noticed too.
        self.sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        self.sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        self.sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
        self.socket_mode = socket_mode
        self.peers: dict[bytes, Peer] = {}
        self._calls: collections.deque = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.handler: Callable[[Ctx], None] | None = None
        self.stopping = False
        self.stop_requested = False
        self.idle_checks: list[Callable[[], bool]] = []   # shutdown waits until all are True
        self.on_peer_gone: list[Callable[[Peer], None]] = []   # run when a client disconnects
        self.metrics = Metrics()      # requests by type and result; gauges bound by ``ops``

    # -- setup --------------------------------------------------------------------------------
    def bind(self) -> None:
        path = self.url[len("ipc://"):] if self.url.startswith("ipc://") else None
        if path:
            old = os.umask(0o777 & ~self.socket_mode)   # the socket is born with socket_mode
            try:
                self.sock.bind(self.url)
            finally:
                os.umask(old)
            os.chmod(path, self.socket_mode)
        else:
            if self.url.startswith("tcp://"):
                self._curve_server()
            self.sock.bind(self.url)

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
        """Run ``fn(*args)`` on the loop thread soon.  Safe from any thread and signal handlers."""
        self._calls.append((fn, args))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass   # the pipe is full, so the loop is already due to wake

    def request_stop(self) -> None:
        self.stop_requested = True
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

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
            while peer.backlog:
                data, on_sent = peer.backlog[0]
                if self._try_send(peer, data, on_sent) != "sent":
                    break
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
        """One request answered (``result``: ok, an error name, disconnected): the metrics.
        Never raises: a metric is not worth a lost reply."""
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
                try:
                    address = frames[1].get("Peer-Address") if len(frames) > 1 else None
                except zmq.ZMQError:
                    address = None
                try:
                    key = frames[1].get("User-Id") if self.auth and len(frames) > 1 else None
                except zmq.ZMQError:
                    key = None
                peer = Peer(ident, address, key, self.key_uids)
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
            self.count(mtype, e.name)
            audit_refusal(peer, mtype, e.to_wire())
            self.send(peer, protocol.reply(rid, "error", e.to_wire()))
        except Exception as e:
            log.exception("handler failed")
            self.count(mtype, Internal.name)
            self.send(peer, protocol.reply(rid, "error", Internal(f"internal error: {e}").to_wire()))

    def _run_calls(self, woken: bool = True) -> None:
        """Run the posted calls; ``woken``: the pipe is readable, empty it first (else no read:
        a syscall and an exception).  A call posted meanwhile has its byte wake the next round."""
        if woken:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
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
        deadline = None
        last_beat = time.monotonic()
        while True:
            backlog = bool(self.peers) and any(p.backlog for p in self.peers.values())
            timeout = 10 if backlog else int(self.heartbeat * 1000 / 2) or 1
            sock_ready = woken = False
            for x, _ in poller.poll(timeout):      # the socket and/or the wake pipe's fd
                if x is self.sock:
                    sock_ready = True
                else:
                    woken = True
            self._run_calls(woken)
            if sock_ready and not self.stopping:
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
        self.sock.close(linger=1000)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        if self.url.startswith("ipc://"):
            try:
                os.unlink(self.url[len("ipc://"):])
            except FileNotFoundError:
                pass
        os.close(self._wake_r)
        os.close(self._wake_w)


CURVE_HINT = ("make the server's keys with 'llmctl keygen --server --dir DIR' and set curve_server_key "
              "and curve_authorized_dir (see llmosd(8)), or use an ipc:// socket")


def load_server_keys(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``zmq.auth`` secret key file; ConfigError naming the file."""
    import zmq.auth
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
        self._address = ""
        self._logged: dict = {}

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
