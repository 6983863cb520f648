"""From a stored manifest to a model and tokenizer in memory, on a device.

Used by the daemon's load path and by tests that compare the engine with a direct forward pass.
``DTYPES`` (dtype names -> torch dtypes) is the one table of the dtypes weights may be stored and
computed in; ``formats/`` and ``mem/devices.py`` import it from here.  Device and dtype *choice*
is the daemon's (``mem/devices.py``).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import mmap
import threading
import weakref
from typing import BinaryIO

import torch
from torch.overrides import TorchFunctionMode

from llmctl.errors import LoadFailed
from llmosd.models import quant as quant_mod
from llmosd.models.llama import Llama, LlamaConfig, check_config, check_shapes, rope_inv_freq
from llmosd.store.store import Store
from llmosd.models.tokenizer import HFTokenizer, SentencePieceTokenizer

log = logging.getLogger("llmosd.loader")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_tokenizer(kind: str, data: bytes, manifest: dict | None = None):
    """The tokenizer of a manifest: its stored bytes plus add-BOS and chat template settings."""
    man = manifest or {}
    add_bos, template = man.get("tokenizer", {}).get("add_bos"), man.get("chat_template")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(data, True if add_bos is None else add_bos, template)
    if kind == "hf-tokenizers":
        return HFTokenizer(data, add_bos, template)
    raise LoadFailed(f"tokenizer type {kind!r} is not supported by this llmosd")


def load_model(store: Store, manifest: dict, device: torch.device,
               dtype: torch.dtype | str | None = torch.float32,
               quant: str = "auto") -> tuple[Llama, object]:
    """Build the model of ``manifest`` with its weights, in eval mode, on ``device``.

    ``dtype``: the compute dtype (a torch dtype or a name of ``DTYPES``; "auto"/None: float32).
    ``quant``: "auto" keeps the weights as stored (quantized ones stay packed, computed by
    ``models.quant``'s kernels; on the CPU without compiled kernels they are dequantized, which
    is faster there), "none" dequantizes everything to ``dtype``, "int8"/"int4" quantizes the
    linear layers (and the embedding, at 8 bits) to that form.  Weights are memory-mapped from
    the store (read-only, copied on write): tensors already in the wanted dtype on the CPU are
    not copied.  An adapter or classifier on a base has no weights of its own: LoadFailed (it
    is served on its base's instance; ``lora.read_adapter`` reads its part)."""
    if not isinstance(manifest.get("weights"), dict):
        base = (manifest.get("base") or {}).get("model") if isinstance(manifest.get("base"), dict) else None
        raise LoadFailed("the model has no weights of its own" + (f": it applies to {base}" if base else ""),
                         hint="load it by name (llmctl load) so that it runs on its base model")
    if quant not in QUANTS:
        raise LoadFailed(f"quant {quant!r} is not one of {', '.join(QUANTS)}")
    dtype = compute_dtype(dtype)
    arch = manifest.get("architecture", "llama")
    if arch != "llama":
        raise LoadFailed(f"architecture {arch!r} is not supported by this llmosd")
    raw = json.loads(store.read_blob(manifest["config"]["digest"]))
    try:
        check_config(raw)              # stored configs were checked on import; older ones were not
    except ValueError as e:
        raise LoadFailed(f"the model's config cannot be used: {e}",
                         hint="import or create the model again with this llmosd") from None
    cfg = LlamaConfig.from_dict(raw)
    tok = _TOKENIZERS.get(store, manifest)
    try:
        with store.open_verified(manifest["weights"]["digest"]) as f:    # hashed once per daemon
            tensors = read_safetensors(f)           # the very file that was verified
        model = build(cfg, tensors, torch.device(device), dtype, quant)
    except ValueError as e:
        raise LoadFailed(f"weights do not fit the config: {e}") from None
    release_free_heap()
    return model.eval(), tok


class _TokenizerCache:
    """The last ``size`` tokenizers built by ``load_model``, by what they are built from (the
    tokenizer blob's digest, add-BOS and chat template): a reload (an unload and load, a
    keep-alive expiry) skips reading, hashing and parsing the tokenizer (~0.1 s for a 49k BPE
    vocabulary, ~60% of a small model's load) at the cost of ~15 MiB kept per entry.
    Tokenizers are never changed after construction, so instances may share one."""

    def __init__(self, size: int = 2):
        self.size, self.lock, self.entries = size, threading.Lock(), {}

    def get(self, store: Store, manifest: dict):
        t = manifest["tokenizer"]
        key = (t["type"], t["digest"], t.get("add_bos"), manifest.get("chat_template"))
        with self.lock:
            tok = self.entries.pop(key, None)
            if tok is not None:
                self.entries[key] = tok            # most recent last
                return tok
        tok = build_tokenizer(t["type"], store.read_blob(t["digest"]), manifest)
        with self.lock:
            self.entries[key] = tok
            while len(self.entries) > self.size:
                del self.entries[next(iter(self.entries))]
        return tok


_TOKENIZERS = _TokenizerCache()


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    Parsing a tokenizer leaves its transient memory free but mapped in malloc's arenas (~30
    MiB for SmolLM2's), counted in the daemon's RSS for good; what the first load's kernel
    compile allocates in between keeps part of it (the daemon's load: -8 MiB)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


QUANTS = ("auto", "none", "int8", "int4")


def compute_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or its name; "auto"/None is float32."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LoadFailed(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


_MAPPED: set[int] = set()          # data pointers of the live weight-file maps (resident_bytes)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | BinaryIO) -> dict[str, torch.Tensor]:
    """name -> CPU tensor of a safetensors file (a path, or a file open for reading: it may be
    closed afterwards), memory-mapped (no read, no copy): the pages are the page cache's until
    written, and a write lands in a private copy (``ACCESS_COPY``), never in the file.
    ValueError for a file that is not safetensors."""
    with (open(path, "rb") if isinstance(path, str) else contextlib.nullcontext(path)) as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError:                 # an empty file cannot be mapped
            raise ValueError("the weights file is empty") from None
    n = int.from_bytes(mm[:8], "little")
    try:
        header = json.loads(mm[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the weights file is not safetensors") from None
    base, out = 8 + n, {}
    storage = torch.frombuffer(mm, dtype=torch.uint8).untyped_storage()    # the whole map, shared
    _MAPPED.add(storage.data_ptr())
    weakref.finalize(mm, _MAPPED.discard, storage.data_ptr())   # when the last tensor goes
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None or base + hi > len(mm) or lo > hi:
            raise ValueError(f"tensor {name} has dtype {info['dtype']} or lies beyond the file's end")
        shape, start = info["shape"], base + lo
        if (hi - lo) != math.prod(shape) * dt.itemsize:
            raise ValueError(f"tensor {name}: its bytes do not fit its shape {shape}")
        if start % dt.itemsize:            # unaligned (not written by safetensors): a copy
            out[name] = torch.frombuffer(bytearray(mm[start:base + hi]), dtype=dt).reshape(shape)
        else:                              # a plain tensor on the map, not a view (compile guards)
            out[name] = torch.empty(0, dtype=dt).set_(storage, start // dt.itemsize, shape)
    return out


def float_weights(path: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named float tensors of a stored weights file, its quantized layers dequantized (to
    ``dtype``, float32 by default): what training, merging and checks start from."""
    tensors = read_safetensors(path)
    groups = quant_mod.stored_groups(tensors)
    out = {k: v for k, v in tensors.items() if not k.endswith(quant_mod.QSUFFIXES)}
    for k, g in groups.items():
        out[k + ".weight"] = quant_mod.dequantize(g["qweight"], g["scales"], g.get("mins"),
                                                  dtype or torch.float32)
    return out


def build(cfg: LlamaConfig, tensors: dict[str, torch.Tensor], device: torch.device,
          dtype: torch.dtype, quant: str = "auto") -> Llama:
    """A Llama of ``cfg`` holding ``tensors`` (HF names; quantized layers as their
    ``.qweight/.scales/.mins``), in the form ``quant`` asks for (see ``load_model``).
    ValueError naming a missing or misshapen tensor."""
    groups = quant_mod.stored_groups(tensors)
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith(quant_mod.QSUFFIXES)}
    shapes.update({k + ".weight": quant_mod.group_shape(g) for k, g in groups.items()})
    check_shapes(cfg, shapes)
    if quant == "auto" and groups and device.type == "cpu" and quant_mod.kernel_mode() != "compiled":
        quant = "none"                     # eager int kernels are slower than float32 GEMMs here
        log.info("quantized weights dequantized to %s: the compiled kernels are not available",
                 str(dtype).replace("torch.", ""))
    with torch.device("meta"), _NoMetaInit():
        model = Llama(cfg)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    quant_mod.install(model, tensors, groups, device, dtype, quant)
    return model
class _NoMetaInit(TorchFunctionMode):
    """Skips the modules' random initialisation of meta tensors while a model is built on the
    meta device: the values do not exist, their weights are replaced by the stored ones, and
    the init functions cost ~25 ms per load (and import torch._dynamo, ~45 MiB, through
    ``torch._refs``).  A torch function mode is per thread: other threads are untouched."""

    INITS = frozenset(getattr(torch.nn.init, n) for n in (
        "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
        "xavier_uniform_", "xavier_normal_", "constant_", "ones_", "zeros_", "orthogonal_"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")
        if func in self.INITS and isinstance(t, torch.Tensor) and t.is_meta:
            return t
        return func(*args, **kwargs)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes this model's own tensors hold, on CUDA and the CPU alike: the storages behind its
    parameters and buffers, each counted once (tied weights share one) and whole (a tensor
    that views part of a storage keeps all of it alive) - except a memory-mapped weights file
    (``read_safetensors``), of which only the tensors in use count (the rest is page cache
    the kernel may drop).  Unlike a difference of the device's allocated memory, this does not
    count what loads or generations running meanwhile hold."""
    storages, mapped = {}, {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        key = (t.device, s.data_ptr())
        if s.data_ptr() in _MAPPED:
            mapped[(key, t.data_ptr(), t.nbytes)] = t.nbytes
        else:
            storages[key] = s.nbytes()
    return sum(storages.values()) + sum(mapped.values())
