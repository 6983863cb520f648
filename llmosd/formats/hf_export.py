"""A stored model → the files of a Hugging Face directory (the way out; ``hf`` reads them in).

Pure functions, no torch: from a manifest, its config and its tokenizer blob they make the
small files (config.json, tokenizer.json or tokenizer.model with tokenizer_config.json,
generation_config.json) as bytes, and say which blobs are written as they are (the safetensors
weights, which already carry Hugging Face tensor names; a SentencePiece model).  Weights stored
quantized (``weights.quant``, issue 13) are refused with the way out: a float import.  The client
writes them in the order given (see ``llmctl export``).
"""
from __future__ import annotations

import json

from llmctl.errors import InvalidArgument
from llmctl.protocol import SAMPLING_KEYS


def json_bytes(obj: dict) -> bytes:
    """A JSON file's bytes, without the fields that are None (HF files omit what is unset)."""
    obj = {k: v for k, v in obj.items() if v is not None}
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def config_json(cfg: dict, dtype: str) -> dict:
    """config.json: the stored config with the fields transformers needs to pick Llama.
    InvalidArgument for rotary frequencies that config.json cannot express."""
    sc = cfg.get("rope_scaling") or {}
    if sc.get("rope_type") == "factors":
        raise InvalidArgument("this model's rotary frequencies come from a GGUF rope_freqs tensor, "
                              "which a Hugging Face config.json cannot express")
    out = dict(cfg)
    out.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "torch_dtype": dtype.split(",")[0], "hidden_act": "silu"})
    return out


def tokenizer_files(tok: dict, blob: bytes, template: str | None) -> tuple[dict, dict]:
    """(the tokenizer's file entry, tokenizer_config.json as a dict without model_max_length)
    for manifest entry ``tok`` whose blob holds ``blob``.  InvalidArgument for another type."""
    add_bos = tok.get("add_bos")
    if tok["type"] == "hf-tokenizers":
        bundle = json.loads(blob)
        tj = json.loads(bundle["tokenizer_json"])
        names = {i: t for t, i in (tj.get("model", {}).get("vocab") or {}).items()}
        names.update({t["id"]: t["content"] for t in tj.get("added_tokens", [])})
        eos = bundle.get("eos_token_ids") or []
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": names.get(bundle.get("bos_token_id")),
                "eos_token": names.get(eos[0]) if eos else None,
                "add_bos_token": bundle.get("add_bos_token", False) if add_bos is None else add_bos,
                "chat_template": template or bundle.get("chat_template")}
        return {"name": "tokenizer.json", "data": bundle["tokenizer_json"].encode()}, tcfg
    if tok["type"] == "sentencepiece":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=blob)

        def piece(i):
            return sp.id_to_piece(i) if i is not None and i >= 0 else None
        tcfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()),
                "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
                "add_bos_token": True if add_bos is None else add_bos, "add_eos_token": False,
                "legacy": True, "chat_template": template}
        return {"name": "tokenizer.model", "digest": tok["digest"], "size": len(blob)}, tcfg
    raise InvalidArgument(f"tokenizer type {tok['type']!r} cannot be exported")


def generation_config(cfg: dict, defaults: dict) -> dict:
    """generation_config.json: special token ids and the model's sampling defaults."""
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
           "pad_token_id": cfg.get("pad_token_id")}
    gen.update({k: defaults[k] for k in SAMPLING_KEYS if k in defaults})
    if gen.get("temperature") == 0:          # HF spells greedy as do_sample=False
        gen.pop("temperature")
        gen["do_sample"] = False
    return gen


def hf_files(manifest: dict, config: dict, tokenizer_blob: bytes) -> list[dict]:
    """Every file of the export, in the order to write them: ``{"name", "data": bytes}`` for a
    file made here, ``{"name", "digest", "size"}`` for a blob written as it is."""
    weights = manifest["weights"]
    if weights.get("quant"):
        raise InvalidArgument(f"the model's weights are stored quantized ({weights['quant']}), which a "
                              "Hugging Face safetensors directory cannot hold",
                              hint="import it again with --dtype float32 (or bfloat16) under another "
                                   "name and export that")
    hf_cfg = config_json(config, weights.get("dtype", "float32"))
    tok_file, tcfg = tokenizer_files(manifest["tokenizer"], tokenizer_blob, manifest.get("chat_template"))
    tcfg["model_max_length"] = config.get("max_position_embeddings")
    return [
        {"name": "config.json", "data": json_bytes(hf_cfg)},
        {"name": "model.safetensors", "digest": weights["digest"], "size": weights.get("size", 0)},
        tok_file,
        {"name": "tokenizer_config.json", "data": json_bytes(tcfg)},
        {"name": "generation_config.json",
         "data": json_bytes(generation_config(config, manifest.get("defaults") or {}))},
    ]
