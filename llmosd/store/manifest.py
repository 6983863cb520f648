"""One builder for the manifests that jobs publish (create, import; later train, finetune), so
every model records the same fields and its lineage the same way.

The JSON is the store's format since schema 1, unchanged (stores written before this module
load as they are)::

    {"schema": 1, "architecture": "llama", "created": "2025-01-01T00:00:00Z", "parameters": N,
     "config":    {"digest", "size", "media": "application/json"},
     "tokenizer": {"digest", "size", "type", "vocab_size"[, "add_bos"]},
     "weights":   {"digest", "size", "format": "safetensors", "dtype"},
     ["chat_template": str | null, "defaults": {sampling key: value},]
     "lineage":   {"method", "parent", "args": {...[, "sources": {file: digest}]}
                   [, "job": id, "final": {step, loss, val_loss, best_val_loss}]}}

(``job`` and ``final`` only for models a training job made.)

Adapters and classifiers (issue 11) are manifests of the same schema whose weights are their
base's: they carry ``kind`` and ``base`` and no ``weights``::

    {..., "kind": "adapter" | "classifier",
     "base":    {"model": "name:tag", "manifest": base manifest digest, "weights": its weights blob},
     "config", "tokenizer": the base's blobs (content-addressed: stored once),
     ["adapter": {"digest", "size", "format": "peft-lora", "rank", "alpha", "dropout",
                  "targets": [...], "rslora": bool},]        PEFT-named LoRA tensors, float32
     ["head":    {"digest", "size", "format": "safetensors", "labels": [...]},]   {"score.weight"}
     "chat_template", "defaults": the base's,
     "lineage": {"method": "finetune" | "import", "parent": base name, ...}}

``base`` has no ``digest`` key on purpose: ``blob_digests`` (every dict with a digest) must
not take the base's manifest for a blob.  A merged classifier is a full model (``weights``)
with ``kind`` "classifier" and a ``head``, and no ``base``.

Pure and torch-free: the daemon reads lineage with it, workers build manifests with it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

SCHEMA = 1


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Blob:
    """A stored blob as a manifest names it."""
    digest: str
    size: int


@dataclass
class Lineage:
    """Where a model came from.  ``method``: create, import, train (later finetune);
    ``parent``: the model it was made from, if any; ``args``: what it was made with;
    ``sources``: the files it was made from (name -> blob digest), kept in ``args`` as
    imports have always recorded them; ``job``: the training job's id; ``final``: where its
    training ended (step, loss, val_loss, best_val_loss)."""
    method: str
    parent: str | None = None
    args: dict = field(default_factory=dict)
    sources: dict[str, str] | None = None
    job: int | None = None
    final: dict | None = None

    def to_dict(self) -> dict:
        args = dict(self.args)
        if self.sources is not None:
            args["sources"] = dict(self.sources)
        out = {"parent": self.parent, "method": self.method, "args": args}
        if self.job is not None:
            out["job"] = self.job
        if self.final is not None:
            out["final"] = dict(self.final)
        return out

    @classmethod
    def of(cls, manifest: dict) -> "Lineage":
        """The lineage a stored manifest records (tolerant: old or odd manifests give what
        they have; ``sources`` only when it is a {name: digest} mapping)."""
        lin = manifest.get("lineage")
        lin = lin if isinstance(lin, dict) else {}
        args = lin.get("args")
        args = dict(args) if isinstance(args, dict) else {}
        src = args.pop("sources", None)
        ok = isinstance(src, dict) and all(isinstance(v, str) for v in src.values())
        parent, job, final = lin.get("parent"), lin.get("job"), lin.get("final")
        return cls(str(lin.get("method") or ""), parent if isinstance(parent, str) else None,
                   args, src if ok else None,
                   job if isinstance(job, int) and not isinstance(job, bool) else None,
                   dict(final) if isinstance(final, dict) else None)


def train_lineage(spec: dict, sources: dict[str, str], parent: dict | None, job: int | None,
                  final: dict) -> Lineage:
    """A trained model's lineage: ``parent`` (the daemon's ``{name, digest, ...}`` of the model
    training continued from, or None), ``args`` the train spec without the daemon's ``_`` keys
    and the data mapping (which ``sources`` records), the job id and the final losses."""
    args = {k: v for k, v in spec.items() if not k.startswith("_") and k != "data"}
    if parent:
        args["parent_digest"] = parent.get("digest")
    return Lineage("train", parent.get("name") if parent else None, args, dict(sources), job,
                   dict(final))


def finetune_lineage(spec: dict, sources: dict[str, str], base: dict, job: int | None,
                     final: dict) -> Lineage:
    """A fine-tuned model's lineage: ``parent`` is the base's name, ``args`` the spec without
    the daemon's ``_`` keys and the data (``sources`` records it), plus the base's digest."""
    args = {k: v for k, v in spec.items() if not k.startswith("_") and k not in ("data", "val_data")}
    args["parent_digest"] = base.get("digest")
    if spec.get("val_data"):
        args["val_sources"] = dict(spec["val_data"])
    return Lineage("finetune", base.get("name"), args, dict(sources), job, dict(final))


def imported_lineage(exported: dict | None, fmt: str, files: dict[str, str], dtype: str) -> Lineage:
    """The lineage of an import: ``exported`` is the lineage a directory carries (an exported
    training run's ``llmosd_lineage.json``), kept with the import's own facts under
    ``args["imported"]``; without it, a plain import of ``files``."""
    if not exported:
        return Lineage("import", args={"format": fmt, "files": sorted(files), "dtype": dtype},
                       sources=dict(files))
    lin = Lineage.of({"lineage": exported})
    lin.args["imported"] = {"format": fmt, "files": dict(files), "dtype": dtype}
    return lin


@dataclass
class Serving:
    """What a source checkpoint says about serving the model: its chat template (or None)
    and sampling defaults (keys of ``llmctl.protocol.SAMPLING_KEYS``)."""
    chat_template: str | None = None
    defaults: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """A model about to be published: its blobs, what they are, and its lineage."""
    parameters: int
    config: Blob
    tokenizer: Blob
    tokenizer_type: str                     # sentencepiece | hf-tokenizers
    vocab_size: int
    weights: Blob
    weights_dtype: str                      # "float32", or "bfloat16,float32" when mixed
    lineage: Lineage
    add_bos: bool | None = None             # None: not recorded (the tokenizer's own default)
    serving: Serving | None = None          # None: nothing recorded (a model made here)
    architecture: str = "llama"
    created: str = field(default_factory=now_iso)

    def to_dict(self) -> dict:
        tok = {"digest": self.tokenizer.digest, "size": self.tokenizer.size,
               "type": self.tokenizer_type, "vocab_size": self.vocab_size}
        if self.add_bos is not None:
            tok["add_bos"] = bool(self.add_bos)
        out = {
            "schema": SCHEMA, "architecture": self.architecture, "created": self.created,
            "parameters": self.parameters,
            "config": {"digest": self.config.digest, "size": self.config.size, "media": "application/json"},
            "tokenizer": tok,
            "weights": {"digest": self.weights.digest, "size": self.weights.size,
                        "format": "safetensors", "dtype": self.weights_dtype},
            "lineage": self.lineage.to_dict(),
        }
        if self.serving is not None:
            out["chat_template"] = self.serving.chat_template
            out["defaults"] = dict(self.serving.defaults)
        return out


KINDS = ("model", "adapter", "classifier")


def kind_of(manifest: dict) -> str:
    """model, adapter or classifier (a manifest without ``kind`` is a model)."""
    k = manifest.get("kind")
    return k if k in KINDS else "model"


def base_of(manifest: dict) -> dict | None:
    """``{"model", "manifest", "weights"}`` of the base whose weights this model uses, or None
    for a model with its own weights."""
    b = manifest.get("base")
    return dict(b) if isinstance(b, dict) and isinstance(b.get("model"), str) else None


@dataclass
class AdapterManifest:
    """An adapter or classifier about to be published: its own blobs (``adapter``: LoRA
    tensors with ``lora`` = {rank, alpha, dropout, targets, rslora}; ``head``: a classifier's
    ``score.weight`` with its ``labels``) on top of a base.  ``base`` is the base's manifest
    (its config, tokenizer and serving settings are shared) with ``base_name`` and
    ``base_digest`` naming it.  ``weights``: for a merged classifier, its own full weights
    (then no base is recorded)."""
    base: dict
    base_name: str
    base_digest: str
    lineage: Lineage
    parameters: int                          # the adapter's (and head's) own parameters
    adapter: Blob | None = None
    lora: dict | None = None
    head: Blob | None = None
    labels: list | None = None
    created: str = field(default_factory=now_iso)

    def to_dict(self) -> dict:
        if self.adapter is None and self.head is None:
            raise ValueError("an adapter manifest needs LoRA weights or a classification head")
        b = self.base
        out = {"schema": SCHEMA, "architecture": b.get("architecture", "llama"),
               "created": self.created, "parameters": self.parameters,
               "kind": "classifier" if self.head is not None else "adapter",
               "base": {"model": self.base_name, "manifest": self.base_digest,
                        "weights": b["weights"]["digest"]},
               "config": dict(b["config"]), "tokenizer": dict(b["tokenizer"])}
        if self.adapter is not None:
            lora = self.lora or {}
            out["adapter"] = {"digest": self.adapter.digest, "size": self.adapter.size,
                              "format": "peft-lora", "rank": int(lora["rank"]),
                              "alpha": float(lora["alpha"]), "dropout": float(lora.get("dropout", 0.0)),
                              "targets": list(lora["targets"]), "rslora": bool(lora.get("rslora", False))}
        if self.head is not None:
            out["head"] = {"digest": self.head.digest, "size": self.head.size,
                           "format": "safetensors", "labels": list(self.labels or [])}
        if "chat_template" in b or "defaults" in b:
            out["chat_template"] = b.get("chat_template")
            out["defaults"] = dict(b.get("defaults") or {})
        out["lineage"] = self.lineage.to_dict()
        return out


def import_sources(manifest: dict) -> dict[str, str]:
    """{file name: digest} a model was imported from (its lineage), or {} if not recorded."""
    lin = Lineage.of(manifest)
    return dict(lin.sources) if lin.method == "import" and lin.sources is not None else {}
