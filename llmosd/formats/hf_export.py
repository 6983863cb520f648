"""A stored model → the files of a Hugging Face directory (the way out; ``hf`` reads them in).

Pure functions, no torch: from a manifest, its config and its tokenizer blob they make the
small files (config.json, tokenizer.json or tokenizer.model with tokenizer_config.json,
generation_config.json) as bytes, and say which blobs are written as they are (the safetensors
weights, which already carry Hugging Face tensor names; a SentencePiece model).  Weights stored
quantized (``weights.quant``, issue 13: ``X.qweight``, ``X.scales`` and, 4-bit, ``X.mins``) have
no Hugging Face form: ``write_float_weights`` dequantizes them exactly (numpy, the arithmetic of
``models.quant.dequantize``) into a float32 safetensors file the caller names instead.  The
client writes the files in the order given (see ``llmctl export``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import BinaryIO, Callable, Iterator

import numpy as np

from llmctl.errors import InvalidArgument, StoreCorrupt
from llmctl.protocol import SAMPLING_KEYS

GROUP = 32                       # elements per quantization group (models.quant.GROUP)
QSUFFIXES = (".qweight", ".scales", ".mins")
ROWS_ELEMENTS = 1 << 22          # dequantized in slabs of about this many elements (bounded memory)
_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I8": "i1", "U8": "u1", "I16": "<i2", "I32": "<i4",
       "I64": "<i8", "BF16": "<u2"}
_FIX = "remove the model with 'llmctl rm' and import it again"


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


def hf_files(manifest: dict, config: dict, tokenizer_blob: bytes,
             float_weights: Callable[[], dict] | None = None) -> list[dict]:
    """Every file of the export, in the order to write them: ``{"name", "data": bytes}`` for a
    file made here, ``{"name", "digest", "size"}`` for a blob to download.  Weights stored
    quantized are named by ``float_weights()`` ({digest, size} of their float32 form, called
    last: after every check here has passed); InvalidArgument when it is not given."""
    weights = manifest["weights"]
    quant = weights.get("quant")
    if quant and float_weights is None:
        raise InvalidArgument(f"the model's weights are stored quantized ({quant}), which a "
                              "Hugging Face safetensors directory cannot hold",
                              hint="export it through the daemon (llmctl export), which dequantizes them")
    hf_cfg = config_json(config, "float32" if quant else weights.get("dtype", "float32"))
    tok_file, tcfg = tokenizer_files(manifest["tokenizer"], tokenizer_blob, manifest.get("chat_template"))
    tcfg["model_max_length"] = config.get("max_position_embeddings")
    wfile = dict(float_weights()) if quant else {"digest": weights["digest"], "size": weights.get("size", 0)}
    return [
        {"name": "config.json", "data": json_bytes(hf_cfg)},
        {"name": "model.safetensors", **wfile},
        tok_file,
        {"name": "tokenizer_config.json", "data": json_bytes(tcfg)},
        {"name": "generation_config.json",
         "data": json_bytes(generation_config(config, manifest.get("defaults") or {}))},
    ]


# -- quantized weights -> float32 (numpy; no torch) --------------------------------------------

def _read(fd: int, offset: int, n: int) -> bytes:
    """``n`` bytes of ``fd`` from ``offset`` (pread: no shared file position; StoreCorrupt when
    the file ends first)."""
    parts, got = [], 0
    while got < n:
        data = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not data:
            raise StoreCorrupt("the stored weights end early (truncated?)", hint=_FIX)
        parts.append(data)
        got += len(data)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def read_header(fd: int) -> tuple[dict, int]:
    """(the tensors' header entries by name, the offset of their data) of the safetensors file
    open at ``fd``; StoreCorrupt when it is not a well-formed safetensors file."""
    size = os.fstat(fd).st_size
    try:
        n = int.from_bytes(_read(fd, 0, 8), "little") if size >= 8 else 0
        if not 2 <= n <= size - 8:
            raise ValueError(f"header length {n} in a file of {size} bytes")
        header = json.loads(_read(fd, 8, n))
        header.pop("__metadata__", None)
        for name, e in header.items():
            b, end = e["data_offsets"]
            if e["dtype"] not in _NP or not 0 <= b <= end <= size - 8 - n:
                raise ValueError(f"tensor {name}: {e['dtype']} at {b}..{end}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreCorrupt(f"the stored weights are not a readable safetensors file ({e})", hint=_FIX) from None
    return header, 8 + n


def _array(fd: int, start: int, e: dict) -> np.ndarray:
    """Header entry ``e``'s tensor, read (BF16 as its uint16 bits)."""
    b, end = e["data_offsets"]
    a = np.frombuffer(_read(fd, start + b, end - b), dtype=_NP[e["dtype"]])
    try:
        return a.reshape(e["shape"])
    except (ValueError, TypeError):
        raise StoreCorrupt(f"a stored tensor's shape {e['shape']} does not match its {end - b} bytes",
                           hint=_FIX) from None


def _float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor as float32, exactly (BF16: its bits are the top half of a float32's)."""
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def dequantize(qweight: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> np.ndarray:
    """The (N, K) float32 weight a stored (qweight, scales[, mins]) triple holds, computed as
    ``models.quant.dequantize`` does (float32 ``q * scale`` then ``+ min``), so bit for bit
    the weights the daemon's own float path uses.  8-bit: int8 (N, K); 4-bit: uint8 (N, K/2),
    per group of 32 byte j = element j (low nibble) | element j+16 (high nibble)."""
    N, G = scales.shape
    s = scales.astype(np.float32)[..., None]
    if mins is None:
        return (qweight.reshape(N, G, GROUP).astype(np.float32) * s).reshape(N, G * GROUP)
    p = qweight.reshape(N, G, GROUP // 2)
    q = np.concatenate([p & 15, p >> 4], axis=-1).astype(np.float32)
    return (q * s + mins.astype(np.float32)[..., None]).reshape(N, G * GROUP)


def float_layout(header: dict) -> dict[str, tuple[list[int], Callable]]:
    """What the float32 file holds, by Hugging Face name (``X.weight`` for a quantized ``X``),
    sorted: (shape, the function of (fd, data start) yielding its float32 row slabs).
    StoreCorrupt for an incomplete or misshapen quantized triple."""
    out = {}
    for name, e in header.items():
        if name.endswith((".scales", ".mins")):
            continue
        if not name.endswith(".qweight"):
            out[name] = (list(e["shape"]), lambda fd, st, e=e: [_float32(_array(fd, st, e), e["dtype"])])
            continue
        path = name[:-len(".qweight")]
        sc, mn = header.get(path + ".scales"), header.get(path + ".mins")
        if not _triple_ok(e, sc, mn):
            raise StoreCorrupt(f"the stored quantized layer {path} is incomplete or misshapen", hint=_FIX)
        shape = sc["shape"]
        out[path + ".weight"] = ([shape[0], shape[1] * GROUP],
                                 lambda fd, st, e=e, sc=sc, mn=mn: _slabs(fd, st, e, sc, mn))
    return dict(sorted(out.items()))


def _triple_ok(qe: dict, se: dict | None, me: dict | None) -> bool:
    """Whether header entries qweight ``qe``, scales ``se`` and mins ``me`` (4-bit only) agree:
    (N, K) int8 or (N, K/2) uint8 beside (N, K/32) float scales (and mins)."""
    if se is None or len(se["shape"]) != 2 or len(qe["shape"]) != 2 or se["dtype"] not in ("F16", "F32", "BF16"):
        return False
    (n, g), four = se["shape"], me is not None
    return (qe["shape"] == [n, g * (GROUP // 2 if four else GROUP)] and qe["dtype"] == ("U8" if four else "I8")
            and (not four or (me["shape"] == [n, g] and me["dtype"] == se["dtype"])))


def _slabs(fd: int, start: int, qe: dict, se: dict, me: dict | None) -> Iterator[np.ndarray]:
    """A quantized layer's float32 rows, a slab of rows at a time (memory stays bounded)."""
    q, s = _array(fd, start, qe), _float32(_array(fd, start, se), se["dtype"])
    m = None if me is None else _float32(_array(fd, start, me), me["dtype"])
    rows = max(1, ROWS_ELEMENTS // (s.shape[1] * GROUP))
    for r in range(0, s.shape[0], rows):
        yield dequantize(q[r:r + rows], s[r:r + rows], None if m is None else m[r:r + rows])


def float_size(header: dict) -> int:
    """Bytes of the float32 file ``write_float_weights`` makes from ``header`` (its own header
    aside: within a few kilobytes)."""
    return sum(4 * int(np.prod(shape)) for shape, _ in float_layout(header).values())


def write_float_weights(src: int, out: BinaryIO) -> tuple[str, int]:
    """Write the stored safetensors weights open at descriptor ``src`` to ``out`` as a float32
    safetensors file with Hugging Face names (quantized layers dequantized, float tensors
    widened; metadata format "pt", as transformers wants); returns (its sha256 digest, its size).
    Reads one tensor at a time and writes a slab of rows at a time (bounded memory)."""
    header, start = read_header(src)
    layout = float_layout(header)
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, _) in layout.items():
        n = 4 * int(np.prod(shape))
        entries[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                       # the data starts 8-aligned
    h = hashlib.sha256()

    def put(data) -> None:
        h.update(data)
        out.write(data)
    put(len(head).to_bytes(8, "little") + head)
    for shape, slabs in layout.values():
        for slab in slabs(src, start):
            put(memoryview(np.ascontiguousarray(slab, dtype="<f4")).cast("B"))
    size = 8 + len(head) + offset
    out.flush()
    if os.fstat(out.fileno()).st_size != size:
        raise StoreCorrupt("writing the float32 weights came out short", hint="check the free disk space")
    return "sha256:" + h.hexdigest(), size
