"""Handler for ``export``: a stored model's Hugging Face files (``formats.hf_export``), or an
adapter's PEFT directory (``formats.peft.adapter_files``: adapter_config.json inline, the
LoRA tensors' blob by digest).  Classifiers are refused for now: neither format holds a head.

The small files are made from the model's config and tokenizer blobs and sent inline; the
weights (and a SentencePiece model) are named by digest for the client to ``download``.
Reading and converting a tokenizer (megabytes of JSON) happens on a short-lived thread, not on
the control loop; the reply comes back through ``ctx.server.post``.
"""
from __future__ import annotations

import json
import logging
import threading

from llmctl.errors import Busy, Internal, InvalidArgument, LlmosdError, StoreCorrupt
from llmosd.formats import hf_export
from llmosd.server import Ctx
from llmosd.store.manifest import kind_of
from llmosd.store.store import Store

log = logging.getLogger("llmosd.ops")

MAX_PARALLEL = 4        # exports being prepared at once; more are refused (try again)


class ExportOps:
    """``op_export``.  ``building`` is only touched on the control loop."""

    def __init__(self, store: Store):
        self.store = store
        self.building = 0

    def op_export(self, ctx: Ctx) -> None:
        canon, man, digest = self.store.find(ctx.body["model"])
        if self.building >= MAX_PARALLEL:
            raise Busy(f"{self.building} exports are being prepared already", hint="try again in a moment")
        self.building += 1
        threading.Thread(target=self._prepare, args=(ctx, canon, man, digest),
                         name="llmosd-export", daemon=True).start()

    def _prepare(self, ctx: Ctx, canon: str, man: dict, digest: str) -> None:
        """On its thread: the reply body, or the error, posted to the loop."""
        try:
            reply = (ctx.ok, {"model": canon, "digest": digest, "kind": kind_of(man),
                              "files": self.files(canon, man)})
        except LlmosdError as e:
            reply = (ctx.error, e)
        except Exception as e:              # noqa: BLE001 - the client must get an answer
            log.exception("export of %s failed", canon)
            reply = (ctx.error, Internal(f"internal error: {e}"))
        ctx.server.post(self._answer, *reply)

    def _answer(self, send, body) -> None:
        self.building -= 1
        send(body)

    def files(self, canon: str, man: dict) -> list[dict]:
        """``hf_export.hf_files`` for the stored model ``canon`` (its blobs checked as read);
        ``peft.adapter_files`` for an adapter.  InvalidArgument for a classifier."""
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
            return hf_export.hf_files(man, config, tok_blob)
        except OSError as e:
            raise StoreCorrupt(f"reading {canon} from the store failed: {e.strerror or e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorrupt(f"{canon} cannot be exported: its manifest, config or tokenizer is "
                               f"malformed ({e.__class__.__name__}: {e})",
                               hint="re-create or re-import the model") from None
