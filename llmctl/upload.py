"""Sending local files into the daemon's store: content-addressed, never twice.

The daemon may run as another user and cannot read the caller's files, so ``import`` and
``train`` send what they need over the socket: first the file's digest (``upload``), and only
when the store lacks it, the content in ``UPLOAD_CHUNK`` pieces (``upload_chunk``).
``import_source`` says what an import path is (GGUF file, Hugging Face directory, PEFT
adapter directory) and which of its files to send.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

from . import protocol
from .errors import InvalidArgument

# The daemon's answer when it said "have" for a file only known as an import's source and now
# needs the content after all: it remembers to ask, and the caller sends and retries once.
RESEND = "were not sent because llmosd knew them"


HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json",
            "llmosd_lineage.json")         # an exported training run's lineage (llmctl train --export)
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def is_peft_dir(path: str) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds adapter_config.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, PEFT_CONFIG))


def import_source(path: str, base: str | None = None) -> tuple[str, dict[str, str]]:
    """(format, {name in the import: local path}) for an import of ``path``: "gguf" (a file that
    starts with GGUF), "hf" (a directory with config.json: its config, tokenizer and
    safetensors files) or "peft" (a directory with adapter_config.json and
    adapter_model.safetensors; needs ``base``, the model it adapts).  InvalidArgument for
    anything else, a PEFT directory without ``base`` and ``base`` for a model."""
    peft = is_peft_dir(path)
    if peft and not base:
        raise InvalidArgument(f"{path} is a PEFT adapter (it has {PEFT_CONFIG}): say which stored "
                              f"model it adapts with --base MODEL", hint="llmctl import DIR NAME --base MODEL")
    if base and not peft:
        raise InvalidArgument(f"--base is for a PEFT adapter directory, and {path} has no {PEFT_CONFIG}",
                              hint="import a model without --base; an adapter directory holds "
                                   f"{PEFT_CONFIG} and {PEFT_WEIGHTS}")
    if peft:
        if not os.path.isfile(os.path.join(path, PEFT_WEIGHTS)):
            bin_ = os.path.isfile(os.path.join(path, "adapter_model.bin"))
            raise InvalidArgument(f"{path} has no {PEFT_WEIGHTS}" + (" (only adapter_model.bin)" if bin_ else ""),
                                  hint="save the adapter with safe_serialization=True (peft's default)")
        return "peft", {n: os.path.join(path, n) for n in (PEFT_CONFIG, PEFT_WEIGHTS)}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InvalidArgument(f"{path} is not a GGUF file",
                                      hint="give a .gguf file or a Hugging Face model directory")
        name = os.path.basename(path)
        return "gguf", {name if name and not name.startswith(".") else "model.gguf": path}
    if not os.path.isdir(path):
        raise InvalidArgument(f"{path} is neither a file nor a directory",
                              hint="give a .gguf file or a Hugging Face model directory")
    names = sorted(n for n in os.listdir(path)
                   if (n in HF_FILES or n.endswith(".safetensors")) and os.path.isfile(os.path.join(path, n)))
    if "config.json" not in names:
        raise InvalidArgument(f"{path} has no config.json", hint="is this a Hugging Face model directory?")
    return "hf", {n: os.path.join(path, n) for n in names}


def sha256_file(path: str) -> tuple[str, int]:
    """("sha256:<hex>", size in bytes) of the file at ``path``."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            n += len(block)
    return "sha256:" + h.hexdigest(), n


def upload_file(client, path: str, progress: Callable[[dict], None] | None = None) -> str:
    """Send one file's content to ``client``'s daemon unless its store has it; returns the digest.
    ``progress`` hears {file, sent, size} per chunk, or {file, sent, size, skipped} once."""
    digest, size = sha256_file(path)
    name = os.path.basename(path)
    if client._call("upload", {"digest": digest, "size": size})["have"]:
        if progress:
            progress({"file": name, "sent": size, "size": size, "skipped": True})
        return digest
    with open(path, "rb") as f:
        offset = 0
        while True:
            data = f.read(protocol.UPLOAD_CHUNK)
            if not data and offset:
                break
            r = client._call("upload_chunk", {"digest": digest, "offset": offset, "data": data})
            offset += len(data)
            if progress:
                progress({"file": name, "sent": offset, "size": size})
            if r.get("complete") or not data:
                break
    return digest
