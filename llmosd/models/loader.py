"""From a stored manifest to a model and tokenizer in memory, on a device.

Used by the daemon's load path and by tests that compare the engine with a direct forward pass.
``DTYPES`` (dtype names -> torch dtypes) is the one table of the dtypes weights may be stored and
computed in; ``formats/`` and ``mem/devices.py`` import it from here.  Device and dtype *choice*
is the daemon's (``mem/devices.py``).
"""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

from llmctl.errors import LoadFailed
from llmosd.models.llama import Llama, LlamaConfig, check_config, rope_inv_freq
from llmosd.store.store import Store
from llmosd.models.tokenizer import HFTokenizer, SentencePieceTokenizer

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
               dtype: torch.dtype = torch.float32) -> tuple[Llama, object]:
    """Build the model of ``manifest`` with its weights, in eval mode, on ``device``.  An
    adapter or classifier on a base has no weights of its own: LoadFailed (it is served on
    its base's instance; ``lora.read_adapter`` reads its part)."""
    if not isinstance(manifest.get("weights"), dict):
        base = (manifest.get("base") or {}).get("model") if isinstance(manifest.get("base"), dict) else None
        raise LoadFailed("the model has no weights of its own" + (f": it applies to {base}" if base else ""),
                         hint="load it by name (llmctl load) so that it runs on its base model")
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
    tok = build_tokenizer(manifest["tokenizer"]["type"], store.read_blob(manifest["tokenizer"]["digest"]),
                          manifest)
    w_digest = manifest["weights"]["digest"]
    store.verify_blob(w_digest)                   # hashed in blocks: weights can be large
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.inv_freq = rope_inv_freq(cfg).to(device)   # to_empty left the buffer uninitialised
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    try:
        with safe_open(store.blob_path(w_digest), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            model.load_weights(_Lazy(f), shapes)
    except ValueError as e:
        raise LoadFailed(f"weights do not fit the config: {e}") from None
    return model.eval(), tok


class _Lazy:
    """name -> tensor, read from the open safetensors file only when asked for."""

    def __init__(self, f):
        self.f = f

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.f.get_tensor(name)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes this model's own tensors hold, on CUDA and the CPU alike: the storages behind its
    parameters and buffers, each counted once (tied weights share one) and whole (a tensor
    that views part of a storage keeps all of it alive).  Unlike a difference of the device's
    allocated memory, this does not count what loads or generations running meanwhile hold."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        storages[(t.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())
