"""Handler for ``export``: a stored model's Hugging Face files (``formats.hf_export``), or an
adapter's PEFT directory (``formats.peft.adapter_files``: adapter_config.json inline, the
LoRA tensors' blob by digest).  Classifiers are refused for now: neither format holds a head.

The small files are made from the model's config and tokenizer blobs and sent inline; the
weights (and a SentencePiece model) are named by digest for the client to ``download``.
Reading and converting a tokenizer (megabytes of JSON) happens on a short-lived thread, not on
the control loop; the reply comes back through ``ctx.server.post``.

Weights stored quantized (issue 13) have no Hugging Face form: that thread dequantizes them
(``hf_export.write_float_weights``, numpy) into a float32 file of the daemon's own directory
``<state dir>/exports`` (0700, never through a link), named by its digest in the reply.  It is
not a store blob: it is held for the client that asked (``FloatWeights`` in its
``peer.holds``: only that client's ``download`` reads it, and its leaving is noticed), and
removed when it has been read to the end, when that client asks for another export or goes
away, or at the daemon's next start.  So the directory holds at most one file per client.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading

from llmctl.errors import Busy, Internal, InvalidArgument, LlmosdError, StoreCorrupt
from llmosd.formats import hf_export
from llmosd.server import Ctx
from llmosd.store.manifest import kind_of
from llmosd.store.paths import READ_FLAGS
from llmosd.store.store import Store

log = logging.getLogger("llmosd.ops")

MAX_PARALLEL = 4        # exports being prepared at once; more are refused (try again)
EXPORTS = "exports"     # beside the store in the state directory: dequantized weights being downloaded
SPACE_MARGIN = 64 << 20  # free bytes left over after writing them
SPACE_HINT = "free disk space in the daemon's state directory, then try again"


class FloatWeights:
    """The float32 weights file made for one client's export of a quantized model: ``path``
    (in the exports directory), open at ``fd`` for ``download`` to read, ``digest`` and
    ``size`` as the reply names them.  Lives in that client's ``peer.holds`` (see the module
    docstring); hashed by identity."""

    def __init__(self, path: str, fd: int, digest: str, size: int):
        self.path, self.fd, self.digest, self.size = path, fd, digest, size

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (b"" past the end)."""
        return os.pread(self.fd, size, offset) if offset < self.size else b""

    def remove(self) -> None:
        """Close it and unlink it (idempotent; never raises: it is only a temporary file)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        _unlink(self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("export: cannot remove %s: %s", path, e.strerror or e)


def held_weights(peer, digest: str) -> FloatWeights | None:
    """The dequantized weights with ``digest`` that an export made for ``peer``, if it holds them."""
    for h in getattr(peer, "holds", ()):
        if isinstance(h, FloatWeights) and h.digest == digest:
            return h
    return None


def release(peer, fw: FloatWeights) -> None:
    """On the loop: ``peer`` no longer holds ``fw``; its descriptor is closed here, and the file
    (hundreds of megabytes, whose blocks the file system frees at the unlink) is unlinked on a
    short thread."""
    getattr(peer, "holds", set()).discard(fw)
    fd, fw.fd = fw.fd, -1
    if fd >= 0:
        os.close(fd)
    threading.Thread(target=_unlink, args=(fw.path,), name="llmosd-export-rm", daemon=True).start()


def drop_held(peer) -> int:
    """Release every dequantized weights file ``peer`` holds; how many there were."""
    held = [h for h in getattr(peer, "holds", ()) if isinstance(h, FloatWeights)]
    for h in held:
        release(peer, h)
    return len(held)


def private_dir(path: str) -> str:
    """Directory ``path`` (made 0700 unless there); StoreCorrupt when it is a symbolic link or
    not a directory: never followed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise StoreCorrupt(f"the state directory's {EXPORTS} entry is {what}; llmosd never follows links "
                           "out of its own tree", hint=f"remove {path} (a link itself, not its target)")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def clear_dir(path: str) -> int:
    """Start-up: remove what a previous run left in the exports directory ``path`` (a link or
    file there is removed itself, never followed); the number of entries removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return 1
    n = 0
    with os.scandir(path) as entries:
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)            # fd-based on Linux: never descends a link
            else:
                os.unlink(e.path)
            n += 1
    return n


class ExportOps:
    """``op_export``.  ``building`` is only touched on the control loop.  ``directory``: where
    dequantized weights wait for their download (default ``<state dir>/exports``, beside the
    store); emptied here, at start-up."""

    def __init__(self, store: Store, directory: str | None = None):
        self.store = store
        self.building = 0
        self.dir = directory or os.path.join(os.path.dirname(os.path.abspath(store.root)), EXPORTS)
        try:
            n = clear_dir(self.dir)
        except OSError as e:
            log.warning("export: cannot empty %s: %s", self.dir, e.strerror or e)
        else:
            if n:
                log.info("export: removed %d dequantized weights file(s) left by a previous run", n)

    def op_export(self, ctx: Ctx) -> None:
        canon, man, digest = self.store.find(ctx.body["model"])
        if self.building >= MAX_PARALLEL:
            raise Busy(f"{self.building} exports are being prepared already", hint="try again in a moment")
        drop_held(getattr(ctx, "peer", None))   # one file per client: an earlier one not downloaded goes
        hooks = getattr(ctx.server, "on_peer_gone", None)
        if hooks is not None and self.peer_gone not in hooks:   # Ops only tells the store's handler
            hooks.append(self.peer_gone)
        self.building += 1
        threading.Thread(target=self._prepare, args=(ctx, canon, man, digest),
                         name="llmosd-export", daemon=True).start()

    def peer_gone(self, peer) -> None:
        """A client left: the weights made for its exports go."""
        if drop_held(peer):
            log.info("%r went away; removed the dequantized weights of its export", peer)

    def _prepare(self, ctx: Ctx, canon: str, man: dict, digest: str) -> None:
        """On its thread: the reply body, or the error, posted to the loop."""
        made: list[FloatWeights] = []
        try:
            reply = (ctx.ok, {"model": canon, "digest": digest, "kind": kind_of(man),
                              "files": self.files(canon, man, made)})
        except LlmosdError as e:
            reply = (ctx.error, e)
        except Exception as e:              # noqa: BLE001 - the client must get an answer
            log.exception("export of %s failed", canon)
            reply = (ctx.error, Internal(f"internal error: {e}"))
        fw = made[0] if made else None
        if fw is not None and isinstance(reply[1], LlmosdError):
            fw.remove()                      # (made before a later step failed: nobody will read it)
            fw = None
        ctx.server.post(self._answer, ctx, *reply, fw)

    def _answer(self, ctx: Ctx, send, body, fw: FloatWeights | None) -> None:
        """On the loop: the reply; ``fw`` is held for the client, or removed if it has gone."""
        self.building -= 1
        if fw is not None:
            peers = getattr(ctx.server, "peers", None)
            if peers is not None and peers.get(ctx.peer.ident) is not ctx.peer:
                fw.remove()                  # it left while they were made: nobody will read them
                return
            drop_held(ctx.peer)              # another export of this client's finished meanwhile
            ctx.peer.holds.add(fw)
        send(body)

    def dequantized(self, canon: str, man: dict) -> FloatWeights:
        """On the export's thread: ``man``'s quantized weights as a float32 safetensors file in
        the exports directory (the stored blob checked against its digest first).  StoreCorrupt
        when the blob is bad or the disk lacks the room (with the sizes)."""
        self.store.verify_blob(man["weights"]["digest"])
        src = os.open(self.store.blob_path(man["weights"]["digest"]), READ_FLAGS)
        try:
            header, _ = hf_export.read_header(src)
            need, d = hf_export.float_size(header), private_dir(self.dir)
            free = shutil.disk_usage(d).free
            if need + SPACE_MARGIN > free:
                raise StoreCorrupt(f"exporting {canon} needs {need / 1e6:.0f} MB for its float32 weights "
                                   f"(they are stored quantized) and the disk has {free / 1e6:.0f} MB free",
                                   hint=SPACE_HINT)
            fd, path = tempfile.mkstemp(dir=d, prefix="weights-", suffix=".safetensors")  # 0600, O_EXCL
            try:
                with os.fdopen(os.dup(fd), "wb") as out:
                    digest, size = hf_export.write_float_weights(src, out)
            except BaseException as e:
                os.close(fd)
                _unlink(path)
                if isinstance(e, OSError):
                    raise StoreCorrupt(f"writing the float32 weights of {canon} failed: {e.strerror or e}",
                                       hint=SPACE_HINT) from None
                raise
        finally:
            os.close(src)
        log.info("export: %s dequantized to float32 (%d bytes) for download", canon, size)
        return FloatWeights(path, fd, digest, size)

    def files(self, canon: str, man: dict, made: list | None = None) -> list[dict]:
        """``hf_export.hf_files`` for the stored model ``canon`` (its blobs checked as read);
        ``peft.adapter_files`` for an adapter.  InvalidArgument for a classifier.  Quantized
        weights are dequantized (``dequantized``); the file is appended to ``made``."""
        kind = kind_of(man)
        if kind == "classifier":
            base = (man.get("base") or {}).get("model")
            raise InvalidArgument(
                f"{canon} is a classifier: its classification head has no place in a Hugging Face "
                "causal-LM or PEFT LoRA directory, so llmosd does not export classifiers yet",
                hint=f"export its base model (llmctl export {base} DIR); the head stays in llmosd"
                if base else "classifiers are used through 'llmctl classify'")
        try:
            if kind == "adapter":
                from llmosd.formats.peft import adapter_files     # torch-free at module level
                return adapter_files(man)
            config = json.loads(self.store.read_blob(man["config"]["digest"]))
            tok_blob = self.store.read_blob(man["tokenizer"]["digest"])
            made = [] if made is None else made

            def float_weights() -> dict:
                made.append(self.dequantized(canon, man))
                return {"digest": made[-1].digest, "size": made[-1].size}
            return hf_export.hf_files(man, config, tok_blob, float_weights)
        except OSError as e:
            raise StoreCorrupt(f"reading {canon} from the store failed: {e.strerror or e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorrupt(f"{canon} cannot be exported: its manifest, config or tokenizer is "
                               f"malformed ({e.__class__.__name__}: {e})",
                               hint="re-create or re-import the model") from None
