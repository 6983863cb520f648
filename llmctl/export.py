"""``llmctl export``: write a stored model as a Hugging Face directory others can load.

The content comes over the socket (``download``), since the daemon's store may not be readable
by the caller.  Files: config.json, model.safetensors (the stored weights as they are: Hugging
Face tensor names), generation_config.json, and tokenizer.json or tokenizer.model with
tokenizer_config.json (special tokens, chat template).  Each file is written to a temporary
name, synced and renamed, so an interrupted export leaves no half-written file.
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


def _json_bytes(obj: dict) -> bytes:
    """A JSON file's bytes, without the fields that are None (HF files omit what is unset)."""
    obj = {k: v for k, v in obj.items() if v is not None}
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def hf_config(cfg: dict, dtype: str) -> dict:
    sc = cfg.get("rope_scaling") or {}
    if sc.get("rope_type") == "factors":
        raise InvalidArgument("this model's rotary frequencies come from a GGUF rope_freqs tensor, "
                              "which a Hugging Face config.json cannot express")
    out = dict(cfg)
    out.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "torch_dtype": dtype.split(",")[0], "hidden_act": "silu"})
    return out


def export_model(client, model: str, dest: str, *, force: bool = False,
                 progress: Callable[[dict], None] | None = None) -> dict:
    """Write ``model`` to directory ``dest``; returns {model, digest, dir, files}."""
    info = client.show(model)
    man, cfg = info["manifest"], info["config"]
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise InvalidArgument(f"{dest} exists and is not a directory")
    if os.path.isdir(dest) and os.listdir(dest) and not force:
        raise AlreadyExists(f"{dest} is not empty", hint="choose a new directory, or pass --force to overwrite")
    os.makedirs(dest, exist_ok=True)
    files = []

    def put(name, data=None, chunks=None):
        _write(dest, name, data, chunks)
        files.append(name)
    put("config.json", _json_bytes(hf_config(cfg, man["weights"].get("dtype", "float32"))))
    put("model.safetensors", chunks=_download(client, man["weights"]["digest"], progress, "model.safetensors"))
    tok = man["tokenizer"]
    data = b"".join(_download(client, tok["digest"], None, "tokenizer"))
    template = man.get("chat_template")
    add_bos = tok.get("add_bos")
    if tok["type"] == "hf-tokenizers":
        bundle = json.loads(data)
        tj = json.loads(bundle["tokenizer_json"])
        names = {i: t for t, i in (tj.get("model", {}).get("vocab") or {}).items()}
        names.update({t["id"]: t["content"] for t in tj.get("added_tokens", [])})
        eos = bundle.get("eos_token_ids") or []
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": names.get(bundle.get("bos_token_id")),
                "eos_token": names.get(eos[0]) if eos else None,
                "add_bos_token": bundle.get("add_bos_token", False) if add_bos is None else add_bos,
                "chat_template": template or bundle.get("chat_template")}
        put("tokenizer.json", bundle["tokenizer_json"].encode())
    elif tok["type"] == "sentencepiece":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=data)

        def piece(i):
            return sp.id_to_piece(i) if i is not None and i >= 0 else None
        tcfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()),
                "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
                "add_bos_token": True if add_bos is None else add_bos, "add_eos_token": False,
                "legacy": True, "chat_template": template}
        put("tokenizer.model", data)
    else:
        raise InvalidArgument(f"tokenizer type {tok['type']!r} cannot be exported")
    tcfg["model_max_length"] = cfg.get("max_position_embeddings")
    put("tokenizer_config.json", _json_bytes(tcfg))
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
           "pad_token_id": cfg.get("pad_token_id")}
    d = man.get("defaults") or {}
    gen.update({k: d[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty") if k in d})
    if gen.get("temperature") == 0:          # HF spells greedy as do_sample=False
        gen.pop("temperature")
        gen["do_sample"] = False
    put("generation_config.json", _json_bytes(gen))
    return {"model": info["model"], "digest": info["digest"], "dir": os.path.abspath(dest), "files": files}
