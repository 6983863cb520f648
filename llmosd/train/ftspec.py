"""Checks of finetune and eval specs (issue 11) that run in the daemon before any work starts:
pure and torch-free, like ``train.spec`` whose train keys and typing they build on.  Each check
raises ValueError naming the first problem (``ops.finetune`` turns it into InvalidArgument) and
returns the spec with every default filled in; its own output checked again comes back unchanged.
The workers (``train.finetune``, ``train.metrics``, ``train.entry``) run the same checks again."""
from __future__ import annotations

import math

from llmosd.train import sft
from llmosd.train.spec import ARCH_KEYS, INTS, TRAIN_KEYS, typed_spec

FT_METHODS = ("full", "lora", "classify")
FT_INTS = {"rank": (1, 1024), "eval_samples": (0, 100_000)}
FT_OWN = ("method", "rank", "alpha", "lora_dropout", "targets", "labels", "head_only", "epochs",
          "eval_samples", "val_data")
# train keys a fine-tune refuses, and why (the architecture keys have their own message)
FT_REFUSED = {"eval_batches": "a fine-tune's validation loss covers every validation example; "
                              "eval_samples caps the greedy answers (exact match, chrF)"}
FINETUNE_KEYS = tuple(k for k in TRAIN_KEYS if k not in ARCH_KEYS and k not in FT_REFUSED) + FT_OWN
# added by check_finetune_spec: taken back (and verified) when checked again
CHECKED_KEYS = ("kind",)
LORA_KEYS = ("rank", "alpha", "lora_dropout", "targets")
DEFAULT_TARGETS = ("q_proj", "v_proj")
FT_LR = {"full": 2e-5, "lora": 3e-4, "classify": 3e-4}
HEAD_ONLY_LR = 1e-3


def _number(k: str, v, lo: float, hi: float, low_open: bool = False) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{k} must be a number, got {v!r:.40}")
    if v > hi or v < lo or (low_open and v == lo):
        raise ValueError(f"{k} must be {'greater than' if low_open else 'at least'} {lo:g} and at "
                         f"most {hi:g}, got {v:g}")
    return float(v)


def _names(k: str, v) -> list[str]:
    """A list of distinct non-empty strings; a comma-separated string is taken too."""
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise ValueError(f"{k} must be a non-empty list of names, got {v!r:.60}")
    v = [x.strip() for x in v]
    dup = [x for i, x in enumerate(v) if x in v[:i]]
    if dup:
        raise ValueError(f"{dup[0]!r} is given twice in {k}")
    return v


def _mapping(k: str, v) -> dict:
    if not isinstance(v, dict) or not all(isinstance(d, str) for d in v.values()):
        raise ValueError(f"{k} must map file names to blob digests")
    return dict(v)


def _typed_finetune(spec: dict) -> dict:
    """Each given key of a finetune spec typed and ranged (None = not given)."""
    if not isinstance(spec, dict):
        raise ValueError(f"the finetune spec must be a mapping, not a {type(spec).__name__}")
    fixed = [k for k in ARCH_KEYS if spec.get(k) is not None]
    if fixed:
        raise ValueError(f"{fixed[0]} cannot be set for a fine-tune: the base model's architecture "
                         "and tokenizer are kept; leave it out")
    refused = [k for k in FT_REFUSED if spec.get(k) is not None]
    if refused:
        raise ValueError(f"{refused[0]} does not apply to a fine-tune: {FT_REFUSED[refused[0]]}; "
                         "leave it out")
    unknown = sorted(str(k) for k in spec if k not in FINETUNE_KEYS and k not in ARCH_KEYS
                     and k not in FT_REFUSED and k not in CHECKED_KEYS)
    if unknown:
        raise ValueError(f"unknown finetune spec key {unknown[0]!r}; known keys: "
                         f"{', '.join(FINETUNE_KEYS)}")
    out = typed_spec({k: v for k, v in spec.items()
                  if k not in FT_OWN and k not in ARCH_KEYS and k not in FT_REFUSED and k not in CHECKED_KEYS})
    for k, v in spec.items():
        if v is None or k not in FT_OWN:
            continue
        if k in FT_INTS:
            lo, hi = FT_INTS[k]
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{k} must be an integer, got {v!r:.40}")
            if not lo <= v <= hi:
                raise ValueError(f"{k} must be between {lo:,} and {hi:,}, got {v:,}")
            out[k] = v
        elif k == "method":
            if v not in FT_METHODS:
                raise ValueError(f"method must be one of {', '.join(FT_METHODS)}, got {v!r:.40}")
            out[k] = v
        elif k == "alpha":
            out[k] = _number(k, v, 0.0, 1e6, low_open=True)
        elif k == "lora_dropout":
            out[k] = _number(k, v, 0.0, 0.95)
        elif k == "epochs":
            out[k] = _number(k, v, 0.0, 10_000.0, low_open=True)
        elif k == "head_only":
            if not isinstance(v, bool):
                raise ValueError(f"head_only must be true or false, got {v!r:.40}")
            out[k] = v
        elif k == "targets":
            out[k] = ["all-linear"] if v == "all-linear" else _names(k, v)
        elif k == "labels":
            out[k] = _names(k, v)
        elif k == "val_data":
            out[k] = _mapping(k, v)
    if spec.get("kind") is not None:
        out["kind"] = spec["kind"]          # from an earlier check: verified against the data
    return out


def _checked_kind(spec: dict, kind: str, where: str) -> None:
    """A spec checked before carries the data's ``kind``: it must still be this data's."""
    given = spec.get("kind")
    if given is not None and given != kind:
        raise ValueError(f"the spec was checked for {given!r} data, but the data (from {where}) "
                         f"holds {kind} examples; check it again without kind")


def _targets(given: list[str] | None, known) -> list[str]:
    """The LoRA target list, "all-linear" expanded; ValueError naming a layer the model lacks."""
    known = tuple(known or ())
    if given is None:
        return list(DEFAULT_TARGETS)
    if given == ["all-linear"] or "all-linear" in given:
        if len(given) > 1:
            raise ValueError("targets: all-linear stands alone; give it or a list of layers")
        return list(known) if known else ["all-linear"]
    for t in given:
        if known and t not in known:
            raise ValueError(f"the model has no linear layer named {t!r}; its linear layers are "
                             f"{', '.join(known)} (or all-linear for every one)")
    return given


def _check_files(what: str, data: dict) -> None:
    for name in data:
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"{what} file name {name!r:.60} must be a plain file name")


def _ft_defaults(s: dict, base: dict) -> dict:
    """Method-dependent defaults (the examples are counted later, for max_steps)."""
    method = s.setdefault("method", "lora")
    head_only = s.setdefault("head_only", False)
    if head_only and method != "classify":
        raise ValueError("head_only applies to --method classify only (a frozen base under a new "
                         "head); leave it out")
    lora = method == "lora" or (method == "classify" and not head_only)
    given = [k for k in LORA_KEYS if k in s]
    if given and not lora:
        what = "--method full" if method == "full" else "--head-only (no LoRA under the head)"
        raise ValueError(f"{given[0]} sets up LoRA, which {what} does not use; leave it out")
    if lora:
        rank = s.setdefault("rank", 8)
        s.setdefault("alpha", 2.0 * rank)
        s.setdefault("lora_dropout", 0.0)
        s["targets"] = _targets(s.get("targets"), base.get("targets_known"))
    else:
        for k in LORA_KEYS:
            s[k] = None
    lr = HEAD_ONLY_LR if head_only else FT_LR[method]
    ctx = base.get("context")
    for k, v in (("lr", lr), ("weight_decay", 0.1 if method == "full" else 0.0),
                 ("block_size", min(512, ctx) if isinstance(ctx, int) else 512),
                 ("batch_size", 8), ("grad_accum", 1), ("dropout", 0.0), ("eval_samples", 32),
                 ("nproc", 1), ("seed", 0), ("device", "auto"), ("dtype", "auto")):
        s.setdefault(k, v)
    s.setdefault("min_lr", s["lr"] / 10)
    if s["min_lr"] > s["lr"]:
        raise ValueError(f"min_lr ({s['min_lr']:g}) must not exceed lr ({s['lr']:g})")
    if isinstance(ctx, int) and s["block_size"] > ctx:
        raise ValueError(f"block_size ({s['block_size']:,}) exceeds the context of "
                         f"{base.get('name') or 'the base model'} ({ctx:,}); give at most {ctx:,}")
    for k in ARCH_KEYS:
        s[k] = None                # the base's, read by the worker
    return s


def check_finetune_spec(spec: dict, data: dict, val_data: dict | None, base: dict) -> dict:
    """Check a ``finetune`` spec against its data and validation data (``{file name: bytes}``,
    JSONL, see ``train.sft``) and its ``base`` (``{"name", "context", "has_template",
    "targets_known"}``); return the spec with every default filled in.  Torch-free: runs on the
    daemon's loop.  ValueError naming the first problem: an unknown or architecture key, a bad
    type or range, a bad JSONL line (file and line), data that does not fit the method or the
    base, epochs and max_steps both, block_size over the context, too few examples.

    Defaults: method lora; LoRA (lora, and classify without head_only): rank 8, alpha 2*rank,
    lora_dropout 0, targets q_proj,v_proj (all-linear: every linear layer of the base); lr 2e-5
    (full), 3e-4 (lora, classify), 1e-3 (classify head_only); min_lr lr/10; weight_decay 0.1
    (full) else 0; block_size min(512, context); batch_size 8; grad_accum 1; dropout 0;
    epochs 1 unless max_steps is given (then epochs is None); max_steps = the steps of the
    epochs; warmup min(100, max_steps/10); eval_every one epoch's steps (at most max_steps);
    checkpoint_every = eval_every; eval_samples 32; seed 0; nproc 1.  (eval_batches is
    refused: the validation loss covers every validation example.)
    Added: ``kind`` (the data's: completion, chat, text, label) and ``labels`` (classify: the
    --labels order or the data's sorted; else None); the LoRA keys are None when unused and
    the architecture keys always (the base's are kept).

    Idempotent: its own output, checked again with the same data and base, comes back
    unchanged (``kind`` must be the data's; epochs with max_steps is taken when max_steps is
    the one those epochs give, as in the output, and refused otherwise)."""
    s = _ft_defaults(_typed_finetune(spec), base)
    _check_files("data", data if isinstance(data, dict) else {})
    examples = sft.parse_examples(data)
    val = None
    if val_data:
        _check_files("validation data", val_data)
        val = sft.parse_examples(val_data)
        if val[0].kind != examples[0].kind:
            raise ValueError(f"{val[0].where}: the validation data holds {val[0].kind} examples but "
                             f"the training data {examples[0].kind} examples; give one format")
    labels = sft.check_examples(examples, s["method"], s.get("labels"), bool(base.get("has_template")))
    for ex in val or ():
        if labels and ex.label not in labels:
            raise ValueError(f"{ex.where}: label {ex.label!r} is not one of the training labels "
                             f"{', '.join(labels)}; fix the line or add examples of it")
    train, _ = sft.split_examples(examples, s["seed"], val)
    _checked_kind(s, examples[0].kind, examples[0].where)
    s["kind"], s["labels"] = examples[0].kind, (labels or None)
    world = s["nproc"]
    per_epoch = sft.steps_for(len(train), 1, s["batch_size"], s["grad_accum"], world)
    if "max_steps" in s and "epochs" not in s:
        s["epochs"] = None
    else:       # max_steps from the epochs; given too (a checked spec has it): it must be that
        derived = min(INTS["max_steps"][1], sft.steps_for(
            len(train), s.setdefault("epochs", 1.0), s["batch_size"], s["grad_accum"], world))
        if s.setdefault("max_steps", derived) != derived:
            raise ValueError(f"give epochs ({s['epochs']:g}) or max_steps ({s['max_steps']:,}), not "
                             "both: each sets the length of the run")
    steps = s["max_steps"]
    s.setdefault("warmup", min(100, steps // 10))
    s.setdefault("eval_every", max(1, min(per_epoch, steps)))
    s.setdefault("checkpoint_every", s["eval_every"])
    if s["warmup"] > steps:
        raise ValueError(f"warmup ({s['warmup']:,}) must not exceed max_steps ({steps:,})")
    return s


EVAL_METRICS = ("loss", "perplexity", "accuracy", "f1", "exact_match", "chrf")
# what each kind of data can measure: loss/perplexity of the trained tokens (as a fine-tune's
# mask picks them), greedy answers for completion/chat, predicted labels for labelled text
EVAL_ALLOWED = {"completion": ("loss", "perplexity", "exact_match", "chrf"),
                "chat": ("loss", "perplexity", "exact_match", "chrf"),
                "text": ("loss", "perplexity"), "label": ("accuracy", "f1")}
EVAL_KEYS = ("metrics", "eval_samples", "block_size", "batch_size", "device", "dtype", "seed", "data")
# added by check_eval_spec: taken back (and verified) when its output is checked again
EVAL_CHECKED = ("kind", "labels")


def check_eval_spec(spec: dict, data: dict, model: dict) -> dict:
    """Check an ``eval`` spec against its data (``{file name: bytes}``, JSONL as fine-tuning
    takes) and the ``model`` (``{"kind": model|adapter|classifier, "labels", "has_template",
    "context"}``); return it with defaults: metrics every one the data allows (completion and
    chat: loss, perplexity, exact_match, chrf; text: loss, perplexity; label: accuracy, f1),
    eval_samples 100 (the greedy answers for exact_match and chrf are generated for at most
    that many examples; loss, perplexity, accuracy and f1 take every example),
    block_size min(512, context), batch_size 8, device auto, dtype auto, seed 0; plus ``kind``
    (the data's) and ``labels`` (label data: the classifier's labels, or for zero-shot on a
    model without a head the data's sorted; else None).  ValueError naming the first problem.
    Idempotent: its own output, checked again with the same data and model, comes back
    unchanged (``kind`` and ``labels``, if given, must be what this data and model give)."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"the eval spec must be a mapping, not a {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in EVAL_KEYS and k not in EVAL_CHECKED)
    if unknown:
        raise ValueError(f"unknown eval spec key {unknown[0]!r}; known keys: {', '.join(EVAL_KEYS)}")
    given = {k: v for k, v in spec.items() if v is not None}
    s = typed_spec({k: v for k, v in given.items() if k not in ("metrics", "eval_samples") + EVAL_CHECKED})
    _check_files("data", data if isinstance(data, dict) else {})
    examples = sft.parse_examples(data)
    kind = examples[0].kind
    _checked_kind(given, kind, examples[0].where)
    allowed = EVAL_ALLOWED[kind]
    name = model.get("name") or "the model"
    if model.get("kind") == "classifier" and kind != "label":
        raise ValueError(f"{name} is a classifier: evaluate it on labelled data "
                         "{\"text\", \"label\"}")
    if kind == "chat" and not model.get("has_template"):
        raise ValueError(f"the data holds chat examples (from {examples[0].where}) but {name} has no "
                         "chat template to render them; use {\"prompt\", \"completion\"} data")
    metrics = given.get("metrics")
    if metrics is None:
        metrics = list(allowed)
    else:
        metrics = _names("metrics", metrics)
        for m in metrics:
            if m not in EVAL_METRICS:
                raise ValueError(f"unknown metric {m!r}; metrics are {', '.join(EVAL_METRICS)}")
            if m not in allowed:
                raise ValueError(f"metric {m!r} does not apply to {kind} data (from "
                                 f"{examples[0].where}); it allows {', '.join(allowed)}")
    labels = None
    if kind == "label":
        labels = list(model.get("labels") or ())
        if labels:
            for ex in examples:
                if ex.label not in labels:
                    raise ValueError(f"{ex.where}: label {ex.label!r} is not one of {name}'s labels "
                                     f"{', '.join(labels)}; fix the line")
        else:
            labels = sorted({ex.label for ex in examples})
            if len(labels) < 2:
                raise ValueError(f"zero-shot classification needs at least 2 labels; the data has "
                                 f"only {labels[0]!r}")
    n = given.get("eval_samples", 100)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
        raise ValueError(f"eval_samples must be an integer between 1 and 100,000, got {n!r:.40}")
    ctx = model.get("context")
    s.setdefault("block_size", min(512, ctx) if isinstance(ctx, int) else 512)
    if isinstance(ctx, int) and s["block_size"] > ctx:
        raise ValueError(f"block_size ({s['block_size']:,}) exceeds the context of {name} "
                         f"({ctx:,}); give at most {ctx:,}")
    for k, v in (("batch_size", 8), ("device", "auto"), ("dtype", "auto"), ("seed", 0)):
        s.setdefault(k, v)
    if given.get("labels") is not None and given["labels"] != labels:
        raise ValueError(f"the spec's labels {given['labels']!r:.80} are not the ones this data and "
                         f"{name} give ({', '.join(labels) if labels else 'none'}); leave labels out")
    s.update(metrics=metrics, eval_samples=n, kind=kind, labels=labels)
    return s
