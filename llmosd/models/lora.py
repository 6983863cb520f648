"""LoRA adapters on the Llama decoder, in PEFT's math and tensor names.

An adapter adds ``B(A(dropout(x))) * scale`` to the output of each target linear layer
(``scale = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).  The target ``nn.Linear`` modules
are replaced by ``LoraLinear``, which shares their weight and bias Parameters (the base's
state-dict names and memory stay as they are) and holds any number of named adapters; the
active one (``set_active``) is applied, none gives exactly the base layer's output.

Tensors travel under PEFT's key names, ``base_model.model.<module path>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r), so a stored adapter is a PEFT ``adapter_model.safetensors``.

Adapter names are Python identifiers (``ParameterDict`` keys); every function here also takes
an adapter key such as a manifest digest (``sha256:...``) and maps it with ``adapter_name``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.errors import LoadFailed
from llmosd.models.llama import LlamaConfig, expected_shapes
from llmosd.models.quant import QLinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."


def resolve_targets(targets) -> tuple[str, ...]:
    """The target layer names of ``targets``: "all-linear" (or ["all-linear"]) -> TARGETS; a
    comma-separated string or a list of names -> those, in TARGETS order.  ValueError naming
    the first unknown name."""
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
    elif isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        names = [t.strip() for t in targets]
    else:
        raise ValueError(f"targets must be a list of layer names or \"all-linear\", got {targets!r:.60}")
    if names == ["all-linear"]:
        return TARGETS
    if not names:
        raise ValueError(f"no LoRA target given; choose from {', '.join(TARGETS)} or all-linear")
    for t in names:
        if t not in TARGETS:
            raise ValueError(f"the model has no linear layer named {t!r}; LoRA targets are "
                             f"{', '.join(TARGETS)} (or all-linear)")
    return tuple(t for t in TARGETS if t in names)


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = ("q_proj", "v_proj")
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return {"rank": int(self.rank), "alpha": float(self.alpha), "dropout": float(self.dropout),
                "targets": list(self.targets), "rslora": bool(self.rslora)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        """From ``to_dict``'s form (a manifest's ``adapter`` entry: extra keys are ignored)."""
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)),
                   resolve_targets(list(d["targets"])), bool(d.get("rslora", False)))


def adapter_name(key: str) -> str:
    """The module-safe name of adapter ``key``: an identifier stays as it is; a digest
    ``sha256:<hex>`` becomes ``a<first 16 hex digits>``."""
    if key.isidentifier():
        return key
    if key.startswith("sha256:") and len(key) > 7:
        return "a" + key[7:23]
    raise ValueError(f"adapter name {key!r:.60} is neither an identifier nor a digest")


class LoraLinear(nn.Linear):
    """A linear layer with named LoRA adapters; it shares the replaced layer's Parameters."""

    def __init__(self, base: nn.Linear | QLinear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # a quantized base (served adapters on an int8/int4 model) computes the base term
        # itself; its packed tensors stay shared, the adapter adds a float low-rank term
        self.qbase = base if isinstance(base, QLinear) else None
        self.weight = None if self.qbase is not None else base.weight
        self.register_parameter("bias", None if self.qbase is not None else base.bias)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: str | None = None
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qbase(x) if self.qbase is not None else F.linear(x, self.weight, self.bias)
        name = self.active
        if name is None:
            return y
        a, b = self.lora_A[name], self.lora_B[name]
        h = x.to(a.dtype)
        p = self.dropout[name]
        if self.training and p > 0:
            h = F.dropout(h, p, True)               # torch's global generator: seeded per step
        # as PEFT: the sum in the wider dtype, then back to the base layer's
        return (y + F.linear(F.linear(h, a), b) * self.scale[name]).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={list(self.lora_A)}")


def _targets_of(model) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(module path, parent, attribute, linear) of every linear layer LoRA may target."""
    out = []
    for path, mod in model.named_modules():
        for attr, child in mod.named_children():
            if attr in TARGETS and isinstance(child, (nn.Linear, QLinear)):
                out.append((f"{path}.{attr}" if path else attr, mod, attr, child))
    return out


def _device(lin) -> torch.device:
    """The device of a (LoRA, quantized or plain) linear layer's base weight."""
    if isinstance(lin, LoraLinear) and lin.qbase is not None:
        return lin.qbase.device
    return lin.device if isinstance(lin, QLinear) else lin.weight.device


def _lora_modules(model) -> list[tuple[str, LoraLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLinear)]


def peft_keys(path: str) -> tuple[str, str]:
    """The PEFT keys of the A and B tensors of the layer at module path ``path``."""
    return PREFIX + path + ".lora_A.weight", PREFIX + path + ".lora_B.weight"


def check_adapter_shapes(cfg: LlamaConfig, lcfg: LoraConfig, shapes: dict[str, tuple]) -> list[str]:
    """Raise ValueError naming the first tensor that adapter ``lcfg`` on a model of ``cfg``
    needs and ``shapes`` (PEFT key -> shape) lacks or has misshapen, or the first it has
    beyond them; returns the expected keys in model order.  Pure: shapes only."""
    targets = resolve_targets(list(lcfg.targets))
    if not (isinstance(lcfg.rank, int) and lcfg.rank >= 1):
        raise ValueError(f"the LoRA rank must be an integer >= 1, got {lcfg.rank!r}")
    want = {}
    for name, shape in expected_shapes(cfg).items():
        path = name[:-len(".weight")]
        if name.endswith(".weight") and path.rpartition(".")[2] in targets:
            out_f, in_f = shape
            ka, kb = peft_keys(path)
            want[ka], want[kb] = (lcfg.rank, in_f), (out_f, lcfg.rank)
    for k, s in want.items():
        if k not in shapes:
            raise ValueError(f"LoRA tensor {k} is missing (targets {', '.join(targets)}, "
                             f"{cfg.num_hidden_layers} layers)")
        if tuple(shapes[k]) != s:
            raise ValueError(f"LoRA tensor {k} has shape {tuple(shapes[k])}, but rank {lcfg.rank} "
                             f"on this base model implies {s}")
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]} (and {len(extra) - 1} more): not a LoRA "
                         f"tensor of targets {', '.join(targets)} on this base model")
    return list(want)


def add_adapter(model, name: str, cfg: LoraConfig, tensors: dict | None = None, *, seed: int = 0,
                trainable: bool = False, device=None, dtype=None) -> None:
    """Add adapter ``name`` to ``model`` (its target linear layers become ``LoraLinear`` once).
    ``tensors``: PEFT-keyed A/B tensors, checked first (ValueError naming the first missing,
    unexpected or misshapen key); None: a fresh adapter (A kaiming-uniform from ``seed``,
    B zero: it changes nothing).  Tensors go to each layer's device (or ``device``), in
    ``dtype`` (default float32), with requires_grad = ``trainable``.  Not activated.

    Atomic: every Parameter is built (copied to its device) before any layer changes, so a
    failure part-way (out of memory, an unreadable tensor) leaves the model as it was, and
    the adapter's name free for another try."""
    name = adapter_name(name)
    targets = resolve_targets(list(cfg.targets))
    if any(name in m.lora_A for _, m in _lora_modules(model)):
        raise ValueError(f"the model already has an adapter named {name!r}")
    if tensors is not None:
        check_adapter_shapes(model.config, cfg, {k: tuple(v.shape) for k, v in tensors.items()})
    layers = [t for t in _targets_of(model) if t[2] in targets]
    if not layers:
        raise ValueError(f"the model has none of the target layers {', '.join(targets)}")
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    built = []                                     # (parent, attr, linear, A, B), nothing changed yet
    for path, parent, attr, lin in layers:
        dev = device if device is not None else _device(lin)
        ka, kb = peft_keys(path)
        if tensors is None:
            a = torch.empty(cfg.rank, lin.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            b = torch.zeros(lin.out_features, cfg.rank)
        else:
            a, b = tensors[ka], tensors[kb]
        with torch.no_grad():
            pa = nn.Parameter(a.detach().to(dev, dtype).clone(), requires_grad=trainable)
            pb = nn.Parameter(b.detach().to(dev, dtype).clone(), requires_grad=trainable)
        built.append((parent, attr, lin, pa, pb))
    done = []
    try:
        for parent, attr, lin, pa, pb in built:
            if not isinstance(lin, LoraLinear):
                lin = LoraLinear(lin)
                setattr(parent, attr, lin)
            lin.lora_A[name], lin.lora_B[name] = pa, pb
            lin.scale[name], lin.dropout[name] = cfg.scale, float(cfg.dropout)
            done.append(lin)
    except BaseException:
        for lin in done:                           # undo: no layer keeps half an adapter
            _drop_from(lin, name)
        raise


def _drop_from(m: LoraLinear, name: str) -> None:
    for d in (m.lora_A, m.lora_B):
        if name in d:
            del d[name]
    m.scale.pop(name, None)
    m.dropout.pop(name, None)
    if m.active == name:
        m.active = None


def _with(model, name: str) -> list[tuple[str, LoraLinear]]:
    mods = [(p, m) for p, m in _lora_modules(model) if name in m.lora_A]
    if not mods:
        raise KeyError(f"the model has no adapter {name!r}")
    return mods


def remove_adapter(model, name: str) -> None:
    """Drop adapter ``name`` (KeyError if absent); the layers keep the base's Parameters."""
    name = adapter_name(name)
    for _, m in _with(model, name):
        _drop_from(m, name)


def set_active(model, name: str | None) -> None:
    """Make the next forward passes use adapter ``name`` (None: the base alone).  Layers the
    adapter does not target run as the base.  KeyError for an adapter the model lacks."""
    mods = _lora_modules(model)
    if name is not None:
        name = adapter_name(name)
        if not any(name in m.lora_A for _, m in mods):
            raise KeyError(f"the model has no adapter {name!r}")
    for _, m in mods:
        m.active = name if name in m.lora_A else None


def adapter_parameters(model, name: str) -> list[nn.Parameter]:
    """A then B of every layer of adapter ``name``, in model order."""
    name = adapter_name(name)
    return [p for _, m in _with(model, name) for p in (m.lora_A[name], m.lora_B[name])]


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT keys: cpu, float32, contiguous, detached."""
    name = adapter_name(name)
    out = {}
    for path, m in _with(model, name):
        ka, kb = peft_keys(path)
        out[ka] = m.lora_A[name].detach().to("cpu", torch.float32).contiguous()
        out[kb] = m.lora_B[name].detach().to("cpu", torch.float32).contiguous()
    return out


def merge_adapter(model, name: str) -> None:
    """Fold adapter ``name`` into the base weights (W += scale * B @ A, computed in float32,
    stored in W's dtype) and remove it."""
    name = adapter_name(name)
    with torch.no_grad():
        for _, m in _with(model, name):
            if m.qbase is not None:
                raise ValueError("an adapter cannot be folded into quantized weights in memory: "
                                 "merge it with the merge job, which dequantizes the base")
            a, b = m.lora_A[name].float(), m.lora_B[name].float()
            w = m.weight.float() + (b.to(m.weight.device) @ a.to(m.weight.device)) * m.scale[name]
            m.weight.copy_(w.to(m.weight.dtype))
    remove_adapter(model, name)


@dataclass
class Adapter:
    """An adapter or classifier read from the store, ready to install on its base."""
    key: str
    lora: LoraConfig | None
    tensors: dict | None
    head: torch.Tensor | None
    labels: list | None

    def nbytes(self) -> int:
        ts = list((self.tensors or {}).values()) + ([self.head] if self.head is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _safetensors(store, digest: str, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    data = store.read_blob(digest)                # checked against its digest
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types
        raise LoadFailed(f"the {what} blob is not a readable safetensors file: {e}") from None


def _config(store, manifest: dict) -> LlamaConfig:
    """The model config the manifest names (its base's, for an adapter or classifier)."""
    return LlamaConfig.from_dict(json.loads(store.read_blob(manifest["config"]["digest"])))


def read_adapter(store, manifest: dict, key: str) -> Adapter:
    """The LoRA tensors and/or classification head of an adapter or classifier ``manifest``
    (on the cpu, float32), checked against the base config the manifest names.  LoadFailed
    for blobs that do not fit; StoreCorrupt (from the store) for missing or corrupt ones."""
    lora = tensors = head = labels = cfg = None
    ent = manifest.get("adapter")
    if ent:
        try:
            lora = LoraConfig.from_dict(ent)
            cfg = _config(store, manifest)
            tensors = {k: v.float() for k, v in _safetensors(store, ent["digest"], "adapter").items()}
            check_adapter_shapes(cfg, lora, {k: tuple(v.shape) for k, v in tensors.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise LoadFailed(f"the adapter's LoRA weights cannot be used: {e}",
                             hint="import or fine-tune the adapter again") from None
    hent = manifest.get("head")
    if hent:
        labels = list(hent.get("labels") or [])
        sd = _safetensors(store, hent["digest"], "classifier head")
        head = sd.get("score.weight")
        if head is None or head.dim() != 2 or head.shape[0] != len(labels) or len(sd) != 1:
            raise LoadFailed(f"the classifier head does not fit its {len(labels)} labels",
                             hint="fine-tune the classifier again")
        try:
            hidden = (cfg or _config(store, manifest)).hidden_size
        except (KeyError, TypeError, ValueError) as e:
            raise LoadFailed(f"the classifier's model config cannot be read: {e}") from None
        if head.shape[1] != hidden:                # else a shape error at classify time
            raise LoadFailed(f"the classifier head has shape {tuple(head.shape)}, but {len(labels)} "
                             f"labels on a model of hidden size {hidden} need {(len(labels), hidden)}",
                             hint="fine-tune the classifier again on this base model")
        head = head.float()
    if lora is None and head is None:
        raise LoadFailed("the model has neither LoRA weights nor a classification head")
    return Adapter(key, lora, tensors, head, labels)


def install(model, adapter: Adapter, device) -> None:
    """Add ``adapter``'s LoRA part to ``model`` (not activated) and move its head to ``device``."""
    if adapter.lora is not None:
        add_adapter(model, adapter.key, adapter.lora, adapter.tensors, device=device)
    if adapter.head is not None:
        adapter.head = adapter.head.to(device)


def uninstall(model, key: str) -> None:
    """Remove the LoRA part of adapter ``key`` from ``model`` (nothing if it has none)."""
    name = adapter_name(key)
    if any(name in m.lora_A for _, m in _lora_modules(model)):
        remove_adapter(model, name)
