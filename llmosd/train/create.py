"""``create``: a new model with random weights and a SentencePiece tokenizer trained on text.

Runs inside a job worker process.  It writes only blobs; the daemon publishes the manifest
once this returns, so a crash at any point leaves no half-made model in the store.
"""
from __future__ import annotations

import io
import json
import math
from typing import Callable

import torch
from safetensors.torch import save as save_safetensors

from llmosd.models.llama import Llama, LlamaConfig
from llmosd.store.store import Store, now_iso
from llmosd.models.tokenizer import SentencePieceTokenizer, train_sentencepiece

LIMITS = {"layers": (1, 256), "dim": (8, 16384), "heads": (1, 256), "vocab_size": (300, 262144),
          "context": (16, 1 << 20), "hidden_dim": (8, 65536)}


def check_spec(spec: dict) -> None:
    """Raise ValueError naming the first bad field (run in the daemon before any work starts)."""
    for k, (lo, hi) in LIMITS.items():
        v = spec.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi):
            raise ValueError(f"{k} must be an integer between {lo} and {hi}, got {v!r:.40}")
    kv, rt = spec.get("kv_heads"), spec.get("rope_theta")
    if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool)):
        raise ValueError(f"kv_heads must be an integer, got {kv!r:.40}")
    if rt is not None and not (isinstance(rt, (int, float)) and not isinstance(rt, bool)
                               and math.isfinite(rt) and rt > 0):
        raise ValueError(f"rope_theta must be a finite number greater than 0, got {rt!r:.40}")
    dim, heads = spec["dim"], spec["heads"]
    kv = spec.get("kv_heads") or heads
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    if (dim // heads) % 2:
        raise ValueError(f"head size dim/heads = {dim // heads} must be even for rotary embeddings")
    if kv < 1 or heads % kv:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv})")
    if not spec["text"]:
        raise ValueError("the vocabulary text is empty")


def default_hidden(dim: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of 32."""
    return (int(8 * dim / 3) + 31) // 32 * 32


def create(spec: dict, store_root: str, progress: Callable[[dict], None]) -> dict:
    """Build the blobs for ``spec``; returns the manifest to publish (without name)."""
    store = Store(store_root)
    text = spec["text"]
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    seed = spec.get("seed") or 0
    vocab = spec.get("vocab_size") or 1024
    progress({"stage": "tokenizer", "message": f"training a {vocab}-piece tokenizer on "
                                               f"{len(text):,} characters"})
    sp_bytes = train_sentencepiece(text, vocab, seed)
    tok = SentencePieceTokenizer(sp_bytes)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=spec["dim"],
        intermediate_size=spec.get("hidden_dim") or default_hidden(spec["dim"]),
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec.get("kv_heads") or spec["heads"],
        max_position_embeddings=spec.get("context") or 2048, rms_norm_eps=1e-5,
        rope_theta=float(spec.get("rope_theta") or 10000.0),
        tie_word_embeddings=bool(spec.get("tie_embeddings", False)),
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    progress({"stage": "weights", "message": f"initialising {cfg.num_hidden_layers} layers, "
                                             f"width {cfg.hidden_size}, seed {seed}"})
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Llama(cfg)
    model.init_weights(seed)
    weights = save_safetensors(model.state_dict_for_save(), metadata={"format": "pt"})
    progress({"stage": "store", "message": f"writing {len(weights):,} bytes of weights"})
    cfg_digest, cfg_size = store.put_blob(json.dumps(cfg.to_dict(), sort_keys=True, indent=1).encode())
    tok_digest, tok_size = store.put_blob(sp_bytes)
    w_digest, w_size = store.put_blob(io.BytesIO(weights))
    args = {k: spec.get(k) for k in ("layers", "dim", "heads", "kv_heads", "vocab_size", "seed",
                                     "hidden_dim", "context", "rope_theta", "tie_embeddings")}
    args["text_chars"] = len(text)
    return {
        "schema": 1, "architecture": "llama", "created": now_iso(),
        "parameters": model.param_count(),
        "config": {"digest": cfg_digest, "size": cfg_size, "media": "application/json"},
        "tokenizer": {"digest": tok_digest, "size": tok_size, "type": "sentencepiece",
                      "vocab_size": tok.vocab_size},
        "weights": {"digest": w_digest, "size": w_size, "format": "safetensors", "dtype": "float32"},
        "lineage": {"parent": None, "method": "create", "args": args},
    }
