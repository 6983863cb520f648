"""PEFT LoRA adapter directories, out and in: ``adapter_config.json`` + ``adapter_model.safetensors``.

Out (``adapter_config``, ``adapter_files``): pure, torch-free; the stored adapter blob already
holds PEFT's tensor names (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``),
so it is written as it is, beside a config that ``peft.PeftModel.from_pretrained`` reads.

In (``import_adapter``, a job function run in a worker; ``read_peft_dir`` does the reading):
the config is checked for what llmosd's LoRA does not model (DoRA, biases, fan-in-fan-out,
extra trained modules, per-layer ranks or layer subsets, other task types), the tensors'
shapes against the base model's config before any is read, and the tensors are stored as
float32.  Refusals are ValueErrors (the job reports invalid input) naming the problem and
the fix.  Torch is imported inside the functions: the daemon names the job without it.
"""
from __future__ import annotations

import json
import re
from typing import Callable

from llmctl.errors import InvalidArgument
from llmosd.store.manifest import AdapterManifest, Blob, Lineage, base_of
from llmosd.store.store import Store

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"


def _number(v):
    """An integral float as an int (PEFT writes lora_alpha as an int)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def adapter_config(manifest: dict, base_name: str) -> dict:
    """adapter_config.json of adapter ``manifest`` (PEFT LORA, CAUSAL_LM) on ``base_name``."""
    a = manifest["adapter"]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": int(a["rank"]), "lora_alpha": _number(float(a["alpha"])),
        "lora_dropout": float(a.get("dropout", 0.0)), "target_modules": list(a["targets"]),
        "use_rslora": bool(a.get("rslora", False)), "use_dora": False, "bias": "none",
        "lora_bias": False, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def adapter_files(manifest: dict) -> list[dict]:
    """The files of a PEFT directory for adapter ``manifest``, as ``hf_export.hf_files``
    gives them: ``{"name", "data"}`` made here, ``{"name", "digest", "size"}`` a blob as it is.
    InvalidArgument for a model that is not a LoRA adapter (a classifier: merge it)."""
    if manifest.get("head") or manifest.get("kind") == "classifier":
        raise InvalidArgument("a classifier cannot be exported in the PEFT format (its head is not "
                              "a LoRA adapter)", hint="merge it (llmctl merge) and export the result")
    ent = manifest.get("adapter")
    if not ent:
        raise InvalidArgument("this model is not a LoRA adapter")
    base = (base_of(manifest) or {}).get("model") or ""
    data = (json.dumps(adapter_config(manifest, base), indent=2, sort_keys=True) + "\n").encode()
    return [{"name": CONFIG_FILE, "data": data},
            {"name": WEIGHTS_FILE, "digest": ent["digest"], "size": ent.get("size", 0)}]


# -- in ---------------------------------------------------------------------------------------
SAVE_HINT = ("save the adapter with safetensors: model.save_pretrained(dir, safe_serialization=True), "
             "or convert adapter_model.bin to adapter_model.safetensors")

# config keys whose non-empty value changes the math or the tensors llmosd applies
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) adapters",
    "lora_bias": "LoRA biases (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 style Conv1D layers)",
    "modules_to_save": "adapters that also train whole modules (modules_to_save)",
    "layers_to_transform": "adapters on a subset of the layers (layers_to_transform)",
    "layers_pattern": "adapters on a subset of the layers (layers_pattern)",
    "rank_pattern": "per-layer ranks (rank_pattern)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "exclude_modules": "adapters that exclude modules (exclude_modules)",
    "layer_replication": "layer replication",
    "target_parameters": "adapters on parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA adapters (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "megatron_config": "Megatron adapters (megatron_config)",
}


def _bad(msg: str, fix: str = "") -> ValueError:
    return ValueError(f"{msg}" + (f"; {fix}" if fix else ""))


def check_peft_config(cfg) -> dict:
    """The LoRA settings of an adapter_config.json object: {rank, alpha, dropout, rslora,
    targets (a list of names, or None: read from the tensors)}.  ValueError naming the first
    setting llmosd cannot apply.  Pure."""
    if not isinstance(cfg, dict):
        raise _bad(f"{CONFIG_FILE} must be a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise _bad(f"{CONFIG_FILE}: peft_type is {cfg.get('peft_type')!r:.40}; llmosd imports LoRA "
                   "adapters (peft_type LORA) only")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise _bad(f"{CONFIG_FILE}: task_type is {cfg.get('task_type')!r:.40}; llmosd imports "
                   "adapters of causal language models (task_type CAUSAL_LM)",
                   "train the adapter with task_type=\"CAUSAL_LM\"")
    if cfg.get("bias", "none") != "none":
        raise _bad(f"{CONFIG_FILE}: bias is {cfg['bias']!r:.40}; llmosd applies LoRA without "
                   "trained biases", "train the adapter with bias=\"none\"")
    for k, what in UNSUPPORTED.items():
        v = cfg.get(k)
        if not (v is None or v is False or (isinstance(v, (dict, list, str)) and not v)):
            raise _bad(f"{CONFIG_FILE}: {what} are not supported by llmosd",
                       f"train the adapter without {k}")
    r, alpha, p = cfg.get("r"), cfg.get("lora_alpha", 8), cfg.get("lora_dropout", 0.0)
    if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 65536):
        raise _bad(f"{CONFIG_FILE}: r must be an integer from 1, got {r!r:.40}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1e9):
        raise _bad(f"{CONFIG_FILE}: lora_alpha must be a number greater than 0, got {alpha!r:.40}")
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1):
        raise _bad(f"{CONFIG_FILE}: lora_dropout must be a number from 0 to below 1, got {p!r:.40}")
    rs = cfg.get("use_rslora", False)
    if not isinstance(rs, bool):
        raise _bad(f"{CONFIG_FILE}: use_rslora must be true or false, got {rs!r:.40}")
    return {"rank": r, "alpha": float(alpha), "dropout": float(p), "rslora": rs,
            "targets": _config_targets(cfg.get("target_modules"))}


def _config_targets(tm) -> list[str] | None:
    """target_modules as layer names: a list (module paths end in the name), "all-linear", or
    one plain name; None for a regular expression (the tensors then say which layers)."""
    from_list = isinstance(tm, (list, tuple))
    if from_list and all(isinstance(t, str) for t in tm):
        return [t.rpartition(".")[2] for t in tm]
    if isinstance(tm, str):
        return [tm] if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", tm) else None
    raise _bad(f"{CONFIG_FILE}: target_modules must be a list of module names or a string, "
               f"got {tm!r:.60}")


def _tensor_targets(keys) -> list[str]:
    """The layer names the PEFT tensor keys name (``...<layer>.lora_A.weight``)."""
    out = set()
    for k in keys:
        m = re.search(r"\.([^.]+)\.lora_[AB]\.weight$", k)
        if m:
            out.add(m.group(1))
    return sorted(out)


def read_peft_dir(paths: dict[str, str], base_config):
    """(LoraConfig, PEFT-keyed float32 cpu tensors) of a PEFT adapter directory whose files are
    at ``paths`` (name -> filesystem path), for a base of ``base_config`` (a LlamaConfig or its
    dict).  Everything is checked before a tensor is read; ValueError naming what is wrong."""
    import torch
    from safetensors import safe_open

    from llmosd.models.llama import LlamaConfig
    from llmosd.models.lora import LoraConfig, check_adapter_shapes, resolve_targets

    if CONFIG_FILE not in paths:
        raise _bad(f"the directory has no {CONFIG_FILE}", "give a directory saved by PEFT's save_pretrained")
    if WEIGHTS_FILE not in paths:
        if BIN_FILE in paths:
            raise _bad(f"{BIN_FILE} is a pickled PyTorch file, which llmosd does not load", SAVE_HINT)
        raise _bad(f"the directory has no {WEIGHTS_FILE}", SAVE_HINT)
    try:
        with open(paths[CONFIG_FILE], "rb") as f:
            raw = json.loads(f.read())
    except ValueError as e:
        raise _bad(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    lc = check_peft_config(raw)
    cfg = base_config if isinstance(base_config, LlamaConfig) else LlamaConfig.from_dict(base_config)
    try:
        with safe_open(paths[WEIGHTS_FILE], framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            names = lc["targets"]
            if names is None:
                names = _tensor_targets(shapes)
            try:
                targets = resolve_targets(names)
            except ValueError as e:
                raise _bad(f"{CONFIG_FILE}: target_modules: {e}") from None
            lora = LoraConfig(lc["rank"], lc["alpha"], lc["dropout"], targets, lc["rslora"])
            try:
                keys = check_adapter_shapes(cfg, lora, shapes)
            except ValueError as e:
                raise _bad(f"{WEIGHTS_FILE} does not fit the base model: {e}",
                           "import the adapter onto the model it was trained on") from None
            tensors = {}
            for k in keys:
                t = f.get_tensor(k)
                if not t.is_floating_point():
                    raise _bad(f"{WEIGHTS_FILE}: tensor {k} holds {t.dtype}, not floating point numbers")
                tensors[k] = t.to(torch.float32).contiguous()
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise _bad(f"{WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
    return lora, tensors


def import_adapter(spec: dict, store_root: str, progress: Callable[[dict], None]) -> dict:
    """Job entry point: the PEFT adapter directory uploaded as ``spec["files"]`` (name -> blob
    digest), on base ``spec["_base"]`` ({name, digest, manifest}) -> the adapter's manifest.
    ValueError (invalid input) naming what cannot be imported."""
    from safetensors.torch import save

    store = Store(store_root)
    files, base = dict(spec["files"]), spec["_base"]
    bman = base["manifest"]
    if base_of(bman) is not None or not bman.get("weights"):
        raise _bad(f"the base {base['name']} is itself an adapter",
                   "import the adapter onto a model with its own weights")
    progress({"stage": "check", "message": f"reading {CONFIG_FILE}"})
    base_cfg = json.loads(store.read_blob(bman["config"]["digest"]))
    paths = {n: store.blob_path(d) for n, d in files.items() if n in (CONFIG_FILE, WEIGHTS_FILE, BIN_FILE)}
    lora, tensors = read_peft_dir(paths, base_cfg)
    progress({"stage": "store", "message": f"writing {len(tensors)} LoRA tensors"})
    blob = Blob(*store.put_blob(save(tensors, metadata={"format": "pt"})))
    with open(paths[CONFIG_FILE], "rb") as f:
        peft_base = json.loads(f.read()).get("base_model_name_or_path")
    args = {"format": "peft", "files": sorted(files), "parent_digest": base["digest"]}
    if isinstance(peft_base, str):
        args["peft_base"] = peft_base
    return AdapterManifest(base=bman, base_name=base["name"], base_digest=base["digest"],
                           lineage=Lineage("import", base["name"], args, dict(files)),
                           parameters=sum(t.numel() for t in tensors.values()),
                           adapter=blob, lora=lora.to_dict()).to_dict()
