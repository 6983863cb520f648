"""Hugging Face checkpoint directories in: ``config.json`` (model_type llama or mistral), one or
many ``*.safetensors`` shards (with ``model.safetensors.index.json``), ``tokenizer.json`` (HF
tokenizers) or ``tokenizer.model`` (SentencePiece), ``tokenizer_config.json`` (special tokens,
chat template), ``generation_config.json`` (end-of-sequence ids, sampling defaults) and, from
an exported llmosd training run, ``llmosd_lineage.json`` (``hf_lineage``).

The files arrive as uploaded blobs.  Every check runs before anything is built or allocated:
the config's types and ranges (``llama.check_config``), then the shapes it implies against the
tensors the files declare (``check_shapes``), and only then are tensors read.  The weights keep
the Hugging Face tensor names.  Runs in the import job's worker.
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

from llmctl.protocol import SAMPLING_KEYS
from llmosd.formats.common import CheckpointError, check_shapes, check_weights
from llmosd.models.llama import LlamaConfig, check_config
from llmosd.models.tokenizer import SentencePieceTokenizer, hf_bundle
from llmosd.store.store import Store

ARCHS = {"llama", "mistral"}


def _json(store: Store, files: dict, name: str, required: bool = False) -> dict | None:
    """The JSON object in file ``name`` (every file a HF directory has is an object)."""
    if name not in files:
        if required:
            raise CheckpointError(f"the directory has no {name}")
        return None
    try:
        d = json.loads(store.read_blob(files[name]))
    except ValueError as e:
        raise CheckpointError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{name} must be a JSON object ({{...}}), but it holds a "
                              f"{'list' if isinstance(d, list) else type(d).__name__}")
    return d


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def hf_config(cfg: dict, gen: dict | None) -> LlamaConfig:
    """The config of a HF directory, every value checked (types, ranges) before use."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json must be a JSON object ({{...}}), not a {type(cfg).__name__}")
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise CheckpointError(f"architecture {mt!r} (config.json model_type) is not supported; "
                              f"supported: {', '.join(sorted(ARCHS))}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    try:
        check_config(cfg)
        c = LlamaConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: {e}") from None
    sw = cfg.get("sliding_window")
    if mt == "mistral" and sw not in (None, 0):
        if not isinstance(sw, int) or isinstance(sw, bool):
            raise CheckpointError(f"config.json: sliding_window must be an integer or null, got {sw!r:.40}")
        if sw < c.max_position_embeddings:
            raise CheckpointError("mistral sliding-window attention is not supported")
    eos = (gen or {}).get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if len(ids) > 64 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CheckpointError(f"generation_config.json: eos_token_id must be a token id or a list "
                                  f"of them, got {eos!r:.40}")
        c.eos_token_id = sorted(c.eos_ids() | set(ids))
    c.architectures, c.model_type = ["LlamaForCausalLM"], "llama"
    return c


def hf_shards(store: Store, files: dict) -> list[str]:
    """The safetensors files holding the weights (the index's shards, or every one)."""
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    index = _json(store, files, "model.safetensors.index.json")
    if index:
        wmap = index.get("weight_map", {})
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError("model.safetensors.index.json: weight_map must map tensor names to file names")
        wanted = sorted(set(wmap.values()))
        missing = [s for s in wanted if s not in files]
        if missing:
            raise CheckpointError(f"the index names shard {missing[0]}, which is not in the directory")
        shards = wanted
    if not shards:
        raise CheckpointError("the directory has no *.safetensors weights "
                              "(PyTorch .bin checkpoints are not supported)")
    return shards


def hf_shapes(store: Store, files: dict, shards: list[str]) -> dict[str, tuple[str, tuple]]:
    """name -> (shard, shape) from the safetensors headers alone: no tensor is read."""
    out = {}
    for shard in shards:
        try:
            with safe_open(store.blob_path(files[shard]), framework="pt") as f:
                for k in f.keys():
                    out[k] = (shard, tuple(f.get_slice(k).get_shape()))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{shard} is not a readable safetensors file: {e}") from None
    return out


def hf_tensors(store: Store, files: dict, where: dict[str, str], progress) -> dict[str, torch.Tensor]:
    """The tensors named in ``where`` (name -> shard), read shard by shard."""
    shards = sorted(set(where.values()))
    out = {}
    for i, shard in enumerate(shards):
        progress({"stage": "weights", "message": f"reading {shard} ({i + 1}/{len(shards)})"})
        try:
            with safe_open(store.blob_path(files[shard]), framework="pt") as f:
                for k, s in where.items():
                    if s == shard:
                        out[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{shard} is not a readable safetensors file: {e}") from None
    return out


LINEAGE_FILE = "llmosd_lineage.json"


def hf_lineage(store: Store, files: dict) -> dict | None:
    """The lineage an exported llmosd training run wrote beside its weights
    (``llmosd_lineage.json``: method, parent, args, job, final), or None without that file."""
    lin = _json(store, files, LINEAGE_FILE)
    if lin is None:
        return None
    if not isinstance(lin.get("method"), str) or not isinstance(lin.get("args", {}), dict):
        raise CheckpointError(f"{LINEAGE_FILE} must hold a lineage: a \"method\" string and an "
                              "\"args\" object")
    return lin


def read_hf(store: Store, files: dict, progress) -> tuple[LlamaConfig, dict, dict, dict]:
    """(config, tensors, tokenizer {type,data,info}, sampling defaults) of a HF directory."""
    cfg_raw = _json(store, files, "config.json", required=True)
    gen = _json(store, files, "generation_config.json") or {}
    cfg = hf_config(cfg_raw, gen)
    # shapes first: a config that does not match its tensors is refused before any is read
    shapes = hf_shapes(store, files, hf_shards(store, files))
    names = check_shapes(cfg, {k: s for k, (_, s) in shapes.items()})
    tok_cfg = _json(store, files, "tokenizer_config.json") or {}
    if "tokenizer.json" in files:
        bundle = hf_bundle(store.read_blob(files["tokenizer.json"]).decode(), tok_cfg, cfg_raw)
        tok = {"type": "hf-tokenizers", "data": bundle, "info": json.loads(bundle)}
    elif "tokenizer.model" in files:
        data = store.read_blob(files["tokenizer.model"])
        try:
            SentencePieceTokenizer(data)
        except Exception as e:
            raise CheckpointError(f"tokenizer.model is not a SentencePiece model: {e}") from None
        add_bos = tok_cfg.get("add_bos_token")
        tok = {"type": "sentencepiece", "data": data,
               "info": {"chat_template": tok_cfg.get("chat_template"),
                        "add_bos_token": True if add_bos is None else bool(add_bos)}}
    else:
        raise CheckpointError("the directory has no tokenizer.json or tokenizer.model")
    sd = check_weights(cfg, hf_tensors(store, files, {k: shapes[k][0] for k in names}, progress))
    defaults = {k: gen[k] for k in SAMPLING_KEYS if _number(gen.get(k))}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return cfg, sd, tok, defaults
