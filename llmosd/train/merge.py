"""The ``merge`` job: an adapter (or classifier) folded into its base's weights, a standalone model.

Each LoRA target weight becomes ``W + scale * B @ A``, computed in float32 and stored in the
base's dtype (``lora.merge_adapter``'s rule, applied to the stored tensors without building a
model); every other tensor is the base's, unchanged (a quantized base is dequantized to float32
first: the merged model is a float model).  A classifier keeps its head (same blob):
the result is a classifier with its own weights and no base.  The lineage says ``merge`` with
the adapter as parent.
"""
from __future__ import annotations


def merged_weights(base_sd: dict, adapter: dict, lcfg) -> dict:
    """The base's tensors (name -> tensor) with the PEFT-keyed LoRA tensors ``adapter`` of
    config ``lcfg`` folded in; ValueError for a LoRA tensor whose base weight is missing."""
    import torch

    from llmosd.models.lora import PREFIX
    out = dict(base_sd)
    for ka in sorted(k for k in adapter if k.endswith(".lora_A.weight")):
        path = ka[len(PREFIX):-len(".lora_A.weight")]
        kb, kw = ka.replace(".lora_A.", ".lora_B."), path + ".weight"
        if kw not in out or kb not in adapter:
            raise ValueError(f"the adapter's tensor {ka} has no base weight {kw} or no lora_B")
        w = out[kw]
        delta = adapter[kb].to(torch.float32) @ adapter[ka].to(torch.float32)
        out[kw] = (w.to(torch.float32) + delta * lcfg.scale).to(w.dtype).contiguous()
    return {k: v.contiguous() for k, v in out.items()}   # no views of the mapped base file


def merge_args(spec: dict) -> dict:
    """The merge lineage's ``args``: the adapter and base it was made of, and the adapter's
    training ``block_size`` when it recorded one (a classifier's inputs are cut to it when it
    serves, ``ops.serve.head_max_len``: the merged classifier must cut them the same way)."""
    args = {"adapter_digest": spec.get("_adapter_digest"), "base": spec["_base"].get("name"),
            "base_digest": spec["_base"].get("digest")}
    made = (spec["_adapter"].get("lineage") or {}).get("args")
    n = made.get("block_size") if isinstance(made, dict) else None
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        args["block_size"] = n
    return args


def run(spec: dict, store_root: str, ctl) -> dict:
    """Job function: spec {"_adapter": the adapter's manifest, "_adapter_name",
    "_adapter_digest", "_base": the base's name, digest and manifest entries}; returns the
    merged model's manifest."""
    from safetensors.torch import save

    from llmosd.models.loader import float_weights
    from llmosd.models.lora import LoraConfig, read_adapter
    from llmosd.store.manifest import Blob, Lineage, Manifest, Serving
    from llmosd.store.store import Store
    store = Store(store_root)
    man, base, name = spec["_adapter"], spec["_base"], spec["_adapter_name"]
    ctl.progress({"stage": "read", "message": f"reading {name} and its base {base.get('name')}"})
    ad = read_adapter(store, man, "merged")            # checked against the base config
    w = base["weights"]
    store.verify_blob(w["digest"])
    sd = float_weights(store.blob_path(w["digest"]))   # a quantized base is merged in float32
    if ad.lora is not None:
        ctl.progress({"stage": "merge", "message": f"folding rank {ad.lora.rank} LoRA into "
                                                   f"{len(ad.tensors) // 2} layers"})
        sd = merged_weights(sd, ad.tensors, LoraConfig.from_dict(man["adapter"]))
    ctl.progress({"stage": "store", "message": "writing the merged weights"})
    blob = Blob(*store.put_blob(save(sd, metadata={"format": "pt"})))
    tok = base["tokenizer"]
    serving = None
    if "chat_template" in base or "defaults" in base:
        serving = Serving(base.get("chat_template"), dict(base.get("defaults") or {}))
    lineage = Lineage("merge", name, merge_args(spec))
    params = sum(t.numel() for t in sd.values())
    out = Manifest(parameters=params + (ad.head.numel() if ad.head is not None else 0),
                   config=Blob(base["config"]["digest"], base["config"]["size"]),
                   tokenizer=Blob(tok["digest"], tok["size"]), tokenizer_type=tok["type"],
                   vocab_size=tok["vocab_size"], weights=blob,
                   weights_dtype=",".join(sorted({str(t.dtype)[6:] for t in sd.values()})) or "float32",
                   lineage=lineage,
                   add_bos=tok.get("add_bos"), serving=serving,
                   architecture=base.get("architecture", "llama")).to_dict()
    if man.get("head"):
        out["kind"], out["head"] = "classifier", dict(man["head"])
    return out
