"""``import``: turn checkpoints people have into store models.  Runs in a job worker process.

Hugging Face directories: ``config.json`` (model_type llama or mistral), one or many
``*.safetensors`` shards (with ``model.safetensors.index.json``), ``tokenizer.json`` (HF
tokenizers) or ``tokenizer.model`` (SentencePiece), ``tokenizer_config.json`` (special tokens,
chat template) and ``generation_config.json`` (end-of-sequence ids, sampling defaults).
The uploaded files arrive as blobs; the result is a native manifest whose weights keep the
Hugging Face tensor names.  GGUF files are read by ``gguf_import``.  Every check runs before
anything is written.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .loader import DTYPES
from .model import Llama, LlamaConfig
from .store import Store, now_iso
from .tokenizer import SentencePieceTokenizer, hf_bundle

ARCHS = {"llama", "mistral"}


class ImportError_(ValueError):
    """A checkpoint that cannot be imported; the message names the problem."""


def _json(store: Store, files: dict, name: str, required: bool = False) -> dict | None:
    if name not in files:
        if required:
            raise ImportError_(f"the directory has no {name}")
        return None
    try:
        return json.loads(store.read_blob(files[name]))
    except ValueError as e:
        raise ImportError_(f"{name} is not valid JSON: {e}") from None


def hf_config(cfg: dict, gen: dict | None) -> LlamaConfig:
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise ImportError_(f"architecture {mt!r} (config.json model_type) is not supported; "
                           f"supported: {', '.join(sorted(ARCHS))}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ImportError_(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if mt == "mistral" and cfg.get("sliding_window") not in (None, 0) and \
            cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        raise ImportError_("mistral sliding-window attention is not supported")
    try:
        c = LlamaConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ImportError_(f"config.json: {e}") from None
    if gen and gen.get("eos_token_id") is not None:
        eos = c.eos_ids() | set(gen["eos_token_id"] if isinstance(gen["eos_token_id"], list)
                                else [gen["eos_token_id"]])
        c.eos_token_id = sorted(eos)
    c.architectures, c.model_type = ["LlamaForCausalLM"], "llama"
    return c


def hf_tensors(store: Store, files: dict, progress) -> dict[str, torch.Tensor]:
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    index = _json(store, files, "model.safetensors.index.json")
    if index:
        wanted = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in wanted if s not in files]
        if missing:
            raise ImportError_(f"the index names shard {missing[0]}, which is not in the directory")
        shards = wanted
    if not shards:
        raise ImportError_("the directory has no *.safetensors weights "
                           "(PyTorch .bin checkpoints are not supported)")
    out = {}
    for i, shard in enumerate(shards):
        progress({"stage": "weights", "message": f"reading {shard} ({i + 1}/{len(shards)})"})
        try:
            with safe_open(store.blob_path(files[shard]), framework="pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise ImportError_(f"{shard} is not a readable safetensors file: {e}") from None
    return out


def check_weights(cfg: LlamaConfig, sd: dict[str, torch.Tensor],
                  source: str = "config.json") -> dict[str, torch.Tensor]:
    """Keep the tensors the model uses; raise naming the first missing or misshapen one."""
    with torch.device("meta"):
        ref = Llama(cfg).state_dict_for_save()
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for k, t in ref.items():
        if k not in sd:
            raise ImportError_(f"tensor {k} is missing from the weights")
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ImportError_(f"tensor {k} has shape {tuple(sd[k].shape)}, but {source} "
                               f"implies {tuple(t.shape)}")
    extra = sorted(set(sd) - set(ref))
    if extra:
        raise ImportError_(f"unexpected tensor {extra[0]} (and {len(extra) - 1} more): "
                           "this is not a plain Llama checkpoint")
    return {k: sd[k].contiguous() for k in ref}


def read_hf(store: Store, files: dict, progress) -> tuple[LlamaConfig, dict, dict, dict]:
    """(config, tensors, tokenizer {type,data,info}, sampling defaults) of a HF directory."""
    cfg_raw = _json(store, files, "config.json", required=True)
    gen = _json(store, files, "generation_config.json") or {}
    cfg = hf_config(cfg_raw, gen)
    tok_cfg = _json(store, files, "tokenizer_config.json") or {}
    if "tokenizer.json" in files:
        bundle = hf_bundle(store.read_blob(files["tokenizer.json"]).decode(), tok_cfg, cfg_raw)
        tok = {"type": "hf-tokenizers", "data": bundle, "info": json.loads(bundle)}
    elif "tokenizer.model" in files:
        data = store.read_blob(files["tokenizer.model"])
        try:
            SentencePieceTokenizer(data)
        except Exception as e:
            raise ImportError_(f"tokenizer.model is not a SentencePiece model: {e}") from None
        add_bos = tok_cfg.get("add_bos_token")
        tok = {"type": "sentencepiece", "data": data,
               "info": {"chat_template": tok_cfg.get("chat_template"),
                        "add_bos_token": True if add_bos is None else bool(add_bos)}}
    else:
        raise ImportError_("the directory has no tokenizer.json or tokenizer.model")
    sd = check_weights(cfg, hf_tensors(store, files, progress))
    defaults = {k: gen[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
                if k in gen}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return cfg, sd, tok, defaults


def import_model(spec: dict, store_root: str, progress: Callable[[dict], None]) -> dict:
    """Job entry point: convert the uploaded files of ``spec`` and return the new manifest."""
    store = Store(store_root)
    files, fmt = spec["files"], spec.get("format", "hf")
    if fmt == "gguf":
        from .gguf_import import import_gguf
        (rel, digest), = files.items()
        cfg, sd, tok, defaults = import_gguf(store, store.blob_path(digest), progress,
                                             spec.get("dtype") or "auto")
        sd = check_weights(cfg, sd, "the GGUF metadata")
    else:
        cfg, sd, tok, defaults = read_hf(store, files, progress)
        if spec.get("dtype") not in (None, "auto"):
            want = DTYPES[spec["dtype"]]
            sd = {k: v.to(want) if v.is_floating_point() else v for k, v in sd.items()}
    progress({"stage": "store", "message": f"writing {len(sd)} tensors"})
    fd, tmp = tempfile.mkstemp(dir=store.tmp, prefix="import-")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            w_digest, w_size = store.put_blob(f)
    finally:
        os.unlink(tmp)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    cfg_digest, cfg_size = store.put_blob(json.dumps(cfg.to_dict(), sort_keys=True, indent=1).encode())
    tok_digest, tok_size = store.put_blob(tok["data"])
    info = tok.get("info") or {}
    return {
        "schema": 1, "architecture": "llama", "created": now_iso(),
        "parameters": sum(t.numel() for t in sd.values()),
        "config": {"digest": cfg_digest, "size": cfg_size, "media": "application/json"},
        "tokenizer": {"digest": tok_digest, "size": tok_size, "type": tok["type"],
                      "vocab_size": cfg.vocab_size, "add_bos": bool(info.get("add_bos_token", True))},
        "weights": {"digest": w_digest, "size": w_size, "format": "safetensors", "dtype": ",".join(dtypes)},
        "chat_template": info.get("chat_template"),
        "defaults": defaults,
        "lineage": {"parent": None, "method": "import", "args": {"format": fmt, "files": sorted(files)}},
    }
