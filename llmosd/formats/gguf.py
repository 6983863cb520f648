"""GGUF files in (llama.cpp / Ollama): metadata -> config, tensors -> HF-named weights.

Runs in a job worker.  By default (dtype "auto") quantized tensors stay quantized: Q8_0, Q4_0
and Q4_1 blocks are kept bit for bit in ``models.quant``'s stored form (``X.qweight``,
``X.scales``, ``X.mins``); other quantized types (K-quants, Q5_x) are dequantized with the
``gguf`` package's reference dequantizer and requantized to int4 (types of up to 4 bits) or
int8 (5 bits and more); F32/F16/BF16 tensors keep their type.  A float dtype dequantizes
everything; int8/int4 quantize everything to that form.  llama.cpp's converter permutes the
rows of ``attn_q``/``attn_k`` (interleaved rotary pairs); that permutation is undone here (on
the packed rows too) so the weights fit the Hugging Face rotary layout our model uses.
"""
from __future__ import annotations

import numpy as np
import torch

from llmosd.formats.common import CheckpointError, check_shapes
from llmosd.formats.gguf_vocab import from_gguf
from llmosd.models.llama import LlamaConfig, check_config
from llmosd.models import quant
from llmosd.models.loader import DTYPES

# Tensor types this importer reads (all dequantizable through gguf.quants.dequantize).
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

PACKED = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}       # kept as they are: bytes per block of 32
LOW_BITS = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K")  # requantized to int4; the others to int8

_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read(path: str):
    """Open a GGUF file; CheckpointError if it is not one or is cut short."""
    import gguf
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError("the file is not GGUF (it does not start with the bytes 'GGUF')")
        return gguf.GGUFReader(path)
    except CheckpointError:
        raise
    except Exception as e:  # the reader raises ValueError/IndexError/... on a cut file
        raise CheckpointError(f"the GGUF file is truncated or corrupt: {e.__class__.__name__}: {e}") from None


def metadata(reader) -> dict:
    """Every key/value pair of the header as plain Python values."""
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            out[k] = f.contents()
        except Exception as e:
            raise CheckpointError(f"metadata key {k} cannot be read: {e}") from None
    return out


# config key -> the GGUF metadata key it comes from (named in error messages)
META_KEYS = {"vocab_size": "llama.vocab_size", "hidden_size": "llama.embedding_length",
             "intermediate_size": "llama.feed_forward_length", "num_hidden_layers": "llama.block_count",
             "num_attention_heads": "llama.attention.head_count",
             "num_key_value_heads": "llama.attention.head_count_kv", "head_dim": "llama.attention.key_length",
             "max_position_embeddings": "llama.context_length",
             "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon", "rope_theta": "llama.rope.freq_base",
             "rope_scaling": "llama.rope.scaling"}


def gguf_config(meta: dict, names: set[str], n_vocab: int) -> LlamaConfig:
    """The config the metadata declares, every value type- and range-checked (``check_config``)
    before any arithmetic, so ``head_count 0`` or two million blocks are refused by name."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} (general.architecture) is not supported; supported: llama")
    p = "llama."

    def need(key):
        if p + key not in meta:
            raise CheckpointError(f"metadata key {p + key} is missing")
        return meta[p + key]
    if meta.get(p + "expert_count", 0):
        raise CheckpointError("mixture-of-experts models (llama.expert_count > 0) are not supported")
    factor = meta.get(p + "rope.scaling.factor", meta.get(p + "rope.scale_linear", 1.0))
    kind = meta.get(p + "rope.scaling.type", "none")
    raw = {"vocab_size": meta.get(p + "vocab_size", n_vocab), "hidden_size": need("embedding_length"),
           "intermediate_size": need("feed_forward_length"), "num_hidden_layers": need("block_count"),
           "num_attention_heads": need("attention.head_count"),
           "num_key_value_heads": meta.get(p + "attention.head_count_kv"),
           "head_dim": meta.get(p + "attention.key_length"),
           "max_position_embeddings": meta.get(p + "context_length", 2048),
           "rms_norm_eps": meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5),
           "rope_theta": meta.get(p + "rope.freq_base", 10000.0),
           "rope_scaling": {"factor": factor},
           "tie_word_embeddings": "output.weight" not in names}
    try:
        check_config(raw, META_KEYS)
    except ValueError as e:
        raise CheckpointError(f"metadata: {e}") from None
    factor = float(factor)
    if kind == "linear" or (kind == "none" and factor != 1.0):
        raw["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif kind not in ("none", None):
        raise CheckpointError(f"rope scaling type {kind!r} is not supported (only linear and llama3 factors)")
    else:
        raw["rope_scaling"] = None
    cfg = LlamaConfig.from_dict(raw)
    rope_dim = meta.get(p + "rope.dimension_count", cfg.head_dim)
    if rope_dim != cfg.head_dim:
        raise CheckpointError(f"partial rotary embeddings (rope.dimension_count {rope_dim!r:.40} is not "
                              f"the head size {cfg.head_dim}) are not supported")
    return cfg


def gguf_shapes(reader) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor in the file, from its header alone (nothing read);
    CheckpointError for a tensor type we cannot dequantize or a name a llama model has not."""
    out = {}
    for t in reader.tensors:
        _qtype(t)
        if t.name != "rope_freqs.weight":
            out[_hf_name(t)] = tuple(int(x) for x in reversed(t.shape))   # GGUF lists ne0 (columns) first
    return out


def _qtype(t) -> str:
    """The tensor's type name; CheckpointError unless llmosd can dequantize it."""
    qtype = t.tensor_type.name
    if qtype not in SUPPORTED:
        raise CheckpointError(f"tensor {t.name} has type {qtype}, which llmosd cannot dequantize; "
                              f"supported: {', '.join(SUPPORTED)}")
    return qtype


def _hf_name(t) -> str:
    """The Hugging Face name of a GGUF tensor; CheckpointError for one a llama model has not."""
    name = hf_name(t.name)
    if name is None:
        raise CheckpointError(f"unexpected tensor {t.name}: this is not a plain llama model")
    return name


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of a (H*D, C) q/k weight.

    llama.cpp reorders each head's D rows from HF's halves layout (rows i and i+D/2 rotate
    together) to interleaved pairs (rows 2i and 2i+1): (H, 2, D/2) -> (H, D/2, 2).  Reverse it.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


AUTO_FLOAT32_LIMIT = 4 << 30     # dtype "float": quantized tensors become float32 up to this many bytes


def store_dtype(reader, dtype: str) -> torch.dtype | None:
    """The dtype dequantized tensors are kept in (dtype "float": float32, exact, unless the
    model would exceed AUTO_FLOAT32_LIMIT that way, then float16); None for "auto", "int8" and
    "int4", which keep or make quantized forms."""
    if dtype == "float":
        n = sum(int(t.n_elements) for t in reader.tensors)
        return torch.float32 if 4 * n <= AUTO_FLOAT32_LIMIT else torch.float16
    return DTYPES.get(dtype)


def packed(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The stored form (``models.quant``) of a Q8_0/Q4_0/Q4_1 tensor's raw blocks, lossless:
    the same quants in the same nibble order, the same float16 scales (and mins; Q4_0's are
    -8 * scale)."""
    N, K = shape
    G = K // quant.GROUP
    blocks = np.ascontiguousarray(data).reshape(N, G, PACKED[qtype])
    d = blocks[..., :2].copy().view(np.float16).reshape(N, G)
    if qtype == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).reshape(N, K)
        return {"qweight": torch.from_numpy(q), "scales": torch.from_numpy(d)}
    if qtype == "Q4_0":
        m, q = d * np.float16(-8), blocks[..., 2:]
    else:
        m, q = blocks[..., 2:4].copy().view(np.float16).reshape(N, G), blocks[..., 4:]
    return {"qweight": torch.from_numpy(q.reshape(N, K // 2).copy()), "scales": torch.from_numpy(d),
            "mins": torch.from_numpy(np.ascontiguousarray(m))}


def _form(t, qtype: str, shape, dtype: str, name: str):
    """("float", tensor) or ("q", {qweight, scales[, mins]}) for one GGUF tensor under ``dtype``
    (auto|float|float32|float16|bfloat16|int8|int4 — "float" is auto's old float32 choice)."""
    import gguf
    head = name in ("model.embed_tokens.weight", "lm_head.weight")
    if dtype == "auto" and qtype in PACKED and len(shape) == 2:
        return "q", packed(t.data, qtype, shape)
    # np.array copies: the reader's arrays are read-only views of the mapped file
    w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
    bits = None
    if len(shape) == 2 and quant.quantizable(shape):
        if dtype == "auto" and qtype not in ("F32", "F16", "BF16"):
            bits = 4 if qtype in LOW_BITS else 8
        elif dtype in ("int8", "int4"):
            bits = 8 if dtype == "int8" or head else 4
    if bits is not None:
        return "q", quant.quantize(w, bits)
    return "float", w


def tensors(reader, cfg: LlamaConfig, progress, dtype: str = "auto",
            target: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[float] | None]:
    """HF-named tensors in the form ``dtype`` asks for (module docstring; quantized layers as
    ``<layer>.qweight/.scales[/.mins]``); F16/BF16 ones keep their type unless ``target`` is a
    narrower float; also llama3-style rope frequency factors."""
    out, factors = {}, None
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        qtype = _qtype(t)
        shape = tuple(int(x) for x in reversed(t.shape))           # GGUF lists ne0 (columns) first
        name = "rope_freqs.weight" if t.name == "rope_freqs.weight" else _hf_name(t)
        try:
            kind, w = _form(t, qtype, shape, dtype if target is None else "float", name)
            if kind == "float":
                if qtype in ("F16", "BF16") and target in (None, torch.float32):   # keep the file's precision
                    w = w.to(torch.float16 if qtype == "F16" else torch.bfloat16)
                elif target not in (None, torch.float32) and w.ndim > 1:          # norms stay float32
                    w = w.to(target)
        except (ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"tensor {t.name} cannot be read (truncated file?): {e}") from None
        if t.name == "rope_freqs.weight":
            factors = [float(x) for x in w.float().flatten()]
            continue
        heads = (cfg.num_attention_heads if name.endswith("q_proj.weight") else
                 cfg.num_key_value_heads if name.endswith("k_proj.weight") else None)
        if kind == "float":
            out[name] = w if heads is None else unpermute(w, heads)
        else:
            path = name[:-len(".weight")]
            for part, v in w.items():
                out[f"{path}.{part}"] = (v if heads is None else unpermute(v, heads)).contiguous()
        if i % 16 == 15 or i == total - 1:
            progress({"stage": "weights", "message": f"converted {i + 1}/{total} tensors",
                      "done": i + 1, "total": total})
    return out, factors


def import_gguf(store, path: str, progress, dtype: str = "auto") -> tuple[LlamaConfig, dict, dict, dict]:
    """(config, tensors, tokenizer {type,data,info}, sampling defaults) of the GGUF at ``path``.
    ``dtype``: auto (quantized tensors kept or requantized, see the module docstring) |
    float (dequantized to float32, float16 for a huge model) | float32|float16|bfloat16 |
    int8|int4."""
    reader = read(path)
    meta = metadata(reader)
    names = {t.name for t in reader.tensors}
    if not meta.get("tokenizer.ggml.tokens"):
        raise CheckpointError("the file has no tokenizer (tokenizer.ggml.model/tokens are missing)")
    # the declared config against the tensors present, before the vocabulary or any weight
    cfg = gguf_config(meta, names, len(meta["tokenizer.ggml.tokens"]))
    check_shapes(cfg, gguf_shapes(reader), "the GGUF metadata")
    kind, data, info = from_gguf(meta)
    cfg.bos_token_id = info["bos_token_id"]
    cfg.eos_token_id = info["eos_token_ids"]
    cfg.pad_token_id = meta.get("tokenizer.ggml.padding_token_id")
    target = store_dtype(reader, dtype)
    if dtype == "float" and target != torch.float32:
        progress({"stage": "weights", "message": "large model: storing dequantized tensors as float16"})
    sd, factors = tensors(reader, cfg, progress, dtype, target)
    if factors is not None:
        if len(factors) != cfg.head_dim // 2:
            raise CheckpointError(f"rope_freqs.weight has {len(factors)} values, the head size needs {cfg.head_dim // 2}")
        cfg.rope_scaling = {"rope_type": "factors", "factors": factors}
    defaults = {}
    for key, name in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                      ("min_p", "min_p"), ("penalty_repeat", "repetition_penalty")):
        if f"general.sampling.{key}" in meta:
            defaults[name] = meta[f"general.sampling.{key}"]
    return cfg, sd, {"type": kind, "data": data, "info": info}, defaults
