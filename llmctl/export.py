"""``llmctl export``: write a stored model as a Hugging Face directory others can load, or an
adapter as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

The daemon makes the files (message ``export``): the small ones (config.json,
generation_config.json, tokenizer_config.json, tokenizer.json) come inline, the blobs
(model.safetensors, the stored weights with their Hugging Face tensor names, and
tokenizer.model) by digest, read with ``download`` since the daemon's store may not be readable
by the caller.  Weights stored quantized come dequantized to float32: a file the daemon made
for this client, removed on its side once read to the end.  Whatever files the daemon lists are written, so an adapter's PEFT files come
the same way.  Each file is written to a temporary name, synced and renamed, so an
interrupted export leaves no half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable

from .errors import AlreadyExists, InvalidArgument, StoreCorrupt


def _write(dest: str, name: str, data: bytes | None = None, chunks=None) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data)
            for piece in chunks or ():
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(dest, name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _download(client, digest: str, progress, label: str):
    """Yield a blob's bytes in pieces, checking its sha256 at the end."""
    h, offset, total = hashlib.sha256(), 0, None
    while total is None or offset < total:
        r = client.download(digest, offset)
        total, data = r["total"], r["data"]
        if not data and offset < total:
            raise StoreCorrupt(f"the daemon sent no data for {digest} at offset {offset}")
        h.update(data)
        offset += len(data)
        if progress:
            progress({"file": label, "sent": offset, "size": total})
        yield data
    if "sha256:" + h.hexdigest() != digest:
        raise StoreCorrupt(f"{label}: the downloaded content does not match its digest {digest}")


def download_blob(client, digest: str, dest: str, name: str,
                  progress: Callable[[dict], None] | None = None) -> None:
    """Write the stored blob ``digest`` to ``dest/name`` (checked against its digest; written
    aside, then renamed).  ``progress`` hears {file, sent, size}."""
    _write(dest, name, chunks=_download(client, digest, progress, name))


def _safe_name(name: str) -> str:
    """A file name from the daemon, refused if it would leave the directory."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise StoreCorrupt(f"the daemon named an export file {name[:100]!r}")
    return name


def export_model(client, model: str, dest: str, *, force: bool = False,
                 progress: Callable[[dict], None] | None = None) -> dict:
    """Write ``model`` to directory ``dest``; returns {model, digest, dir, files, format}:
    format "peft" (with ``base``: the base model it names) for an adapter, else "hf"."""
    r = client.hf_files(model)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise InvalidArgument(f"{dest} exists and is not a directory")
    if os.path.isdir(dest) and os.listdir(dest) and not force:
        raise AlreadyExists(f"{dest} is not empty", hint="choose a new directory, or pass --force to overwrite")
    os.makedirs(dest, exist_ok=True)
    files, out = [], {"format": "hf"}
    for f in r["files"]:
        name = _safe_name(f["name"])
        if name == "adapter_config.json" and "data" in f:
            out = {"format": "peft", "base": _peft_base(f["data"])}
        if "data" in f:
            _write(dest, name, f["data"])
        else:              # progress for the weights only: the tokenizer is small
            shown = progress if name.endswith(".safetensors") else None
            _write(dest, name, chunks=_download(client, f["digest"], shown, name))
        files.append(name)
    return {"model": r["model"], "digest": r["digest"], "dir": os.path.abspath(dest), "files": files, **out}


def _peft_base(config: bytes) -> str | None:
    """The base model an adapter_config.json names (base_model_name_or_path), if any."""
    try:
        base = json.loads(config).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        return None
    return base if isinstance(base, str) else None
