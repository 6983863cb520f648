"""``create``: a new model with random weights and a SentencePiece tokenizer trained on text.

Runs inside a job worker process.  It writes only blobs; the daemon publishes the manifest
once this returns, so a crash at any point leaves no half-made model in the store.  torch and
the model are imported when the job runs: the daemon names ``create`` (a reference the job
runner sends to the worker) without importing them.
"""
from __future__ import annotations

import io
import json
import re
from typing import Callable

from llmosd.store.manifest import Blob, Lineage, Manifest
from llmosd.store.store import Store
from llmosd.train.spec import default_hidden

ARGS = ("layers", "dim", "heads", "kv_heads", "vocab_size", "seed", "hidden_dim", "context",
        "rope_theta", "tie_embeddings")


REQUIRED_CHARS = re.compile(r"required_chars\.\s*(\d+)\s*vs\s*(\d+)")


def vocab_error(e: RuntimeError, vocab: int) -> Exception:
    """sentencepiece's "Vocabulary size is smaller than required_chars. 300 vs 301" as a
    ValueError naming the least ``--vocab-size`` that works (the job system makes a
    ValueError invalid input, exit 65); any other RuntimeError as it is."""
    m = REQUIRED_CHARS.search(str(e))
    if m is None:
        return e
    need = int(m.group(2))
    return ValueError(f"--vocab-size must be at least {need} for this text (its distinct characters, "
                      f"the 256 byte pieces and the special pieces each need one), not {vocab}")


def create(spec: dict, store_root: str, progress: Callable[[dict], None]) -> dict:
    """Build the blobs for ``spec``; returns the manifest to publish (without name)."""
    import torch
    from safetensors.torch import save as save_safetensors

    from llmosd.models.llama import Llama, LlamaConfig
    from llmosd.models.tokenizer import SentencePieceTokenizer, train_sentencepiece

    store = Store(store_root)
    text = spec["text"]
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    seed = spec.get("seed") or 0
    vocab = spec.get("vocab_size") or 1024
    progress({"stage": "tokenizer", "message": f"training a {vocab}-piece tokenizer on "
                                               f"{len(text):,} characters"})
    try:
        sp_bytes = train_sentencepiece(text, vocab, seed)
    except RuntimeError as e:       # sentencepiece's own refusal: bad input, said for the user
        raise vocab_error(e, vocab) from None
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
    config = Blob(*store.put_blob(json.dumps(cfg.to_dict(), sort_keys=True, indent=1).encode()))
    tokenizer = Blob(*store.put_blob(sp_bytes))
    w = Blob(*store.put_blob(io.BytesIO(weights)))
    args = {k: spec.get(k) for k in ARGS}
    args["text_chars"] = len(text)
    return Manifest(parameters=model.param_count(), config=config, tokenizer=tokenizer,
                    tokenizer_type="sentencepiece", vocab_size=tok.vocab_size, weights=w,
                    weights_dtype="float32", lineage=Lineage("create", args=args)).to_dict()
