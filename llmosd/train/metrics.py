"""Evaluations of a model on supervised data: the fine-tuning job's validation and the ``eval``
job (``llmctl eval``) run the same functions, so evaluating a fine-tuned model on its
validation file gives the figures its job reported.

- loss / perplexity: the mean cross entropy of every trained token (completion, assistant,
  text tokens; ``sft.encode``'s mask) over all the examples, batched ``batch_size`` at a time
  in the data's order, right-padded; for a classifier, the mean cross entropy of its head's
  logits over the examples.
- accuracy / f1 (macro): a classifier's predictions, one example at a time (batch 1, as
  serving computes them), on all the examples.
- exact_match / chrf: greedy generations (a plain loop on the KV cache, stopped at an
  end-of-sequence or end-of-turn token, at most a few tokens past the gold answer's length)
  for the first ``eval_samples`` examples.

``run_eval(spec, store_root, ctl)`` is the job function of ``llmctl eval``.
"""
from __future__ import annotations

import json
import math
import os

PAD_ID = 0              # right padding: causal attention keeps it out of the real positions
IGNORE = -100           # cross_entropy's ignore_index: untrained and padded targets
EXTRA_NEW_TOKENS = 4    # greedy answers may run this far past the gold answer's length
LOSS_METRICS = ("loss", "perplexity")
CLASS_METRICS = ("accuracy", "f1")
GEN_METRICS = ("exact_match", "chrf")


def pad_causal(pairs, device):
    """(inputs, targets) int64 tensors (B, T) of ``sft.encode`` pairs (ids, mask): inputs are
    ids[:-1] right-padded with PAD_ID, targets ids[1:] with IGNORE where the mask is 0 and in
    the padding."""
    import torch
    T = max(1, max(len(ids) - 1 for ids, _ in pairs))
    x = torch.full((len(pairs), T), PAD_ID, dtype=torch.long)
    y = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for r, (ids, mask) in enumerate(pairs):
        n = len(ids) - 1
        if n <= 0:
            continue
        x[r, :n] = torch.tensor(ids[:-1])
        y[r, :n] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
    return x.to(device), y.to(device)


def trained_tokens(pair) -> int:
    """How many targets of an encoded example (ids, mask) are trained."""
    return sum(pair[1][1:])


def lm_loss_sum(model, pairs, batch: int, device, amp=None) -> tuple[float, int]:
    """(sum of the cross entropies, number of trained targets) of encoded examples, ``batch``
    at a time in order; ``amp``: the autocast dtype (None: the model's own)."""
    import torch
    import torch.nn.functional as F
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            x, y = pad_causal(pairs[i:i + batch], device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            total += float(F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum").double())
            count += int((y != IGNORE).sum())
    return total, count


def class_logits(model, head, ids: list[int], device):
    """A classifier's (L,) float32 logits of one example, as serving computes them."""
    import torch

    from llmosd.models import classifier
    with torch.no_grad():
        return classifier.head_logits(model, head, [ids], device)[0]


def stop_ids(tok, cfg, template=None) -> set[int]:
    """Tokens that end a greedy answer: the model's and tokenizer's end-of-sequence ids, and
    the chat template's end-of-turn token when it is one token (found by rendering a short
    conversation and reading what the template writes after the assistant's words)."""
    from llmosd.train import sft
    out = set(cfg.eos_ids()) | set(tok.eos_ids())
    template = template or getattr(tok, "chat_template", None)
    if template:
        msgs = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"})
        try:
            segs = sft.chat_segments(template, msgs, bos_token=tok.token(tok.bos_id),
                                     eos_token=tok.token(tok.eos_id))
        except ValueError:
            segs = []
        tail = next((t for t, a in segs if a), "ok")[len("ok"):].strip()
        ids = tok.encode(tail, add_bos=False) if tail else []
        if len(ids) == 1:
            out.add(ids[0])
    return out


def greedy(model, prompt: list[int], max_new: int, stop: set[int], device) -> list[int]:
    """The greedy continuation of ``prompt`` (at most ``max_new`` tokens, within the context),
    without the stop token that ended it."""
    import torch

    from llmosd.models.llama import KVCache
    cfg = model.config
    max_new = min(max_new, cfg.max_position_embeddings - len(prompt))
    if max_new <= 0 or not prompt:
        return []
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(cfg, len(prompt) + max_new, 1, device, dtype)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device), cache, 0, last_only=True)
        pos = len(prompt)
        while True:
            t = int(logits[0, -1].argmax())
            if t in stop:
                break
            out.append(t)
            if len(out) >= max_new:
                break
            logits = model(torch.tensor([[t]], device=device), cache, pos, last_only=True)
            pos += 1
    return out


def input_text(ex) -> str:
    """What a prediction line shows as the input: the prompt, the last user turn, the text."""
    if ex.kind == "completion":
        return ex.prompt
    if ex.kind == "chat":
        return next((m["content"] for m in reversed(ex.messages[:-1]) if m["role"] != "assistant"), "")
    return ex.text


def metric_names(kind: str, classifier: bool, eval_samples: int) -> tuple[str, ...]:
    """The metrics a fine-tune reports on data of ``kind``."""
    if classifier:
        return LOSS_METRICS + CLASS_METRICS
    return LOSS_METRICS + (GEN_METRICS if kind in ("completion", "chat") and eval_samples > 0 else ())


def evaluate(model, tok, examples, *, metrics, block_size: int, batch_size: int,
             eval_samples: int, device, amp=None, head=None, labels=None, encoded=None,
             log=None) -> tuple[dict, list[dict]]:
    """({metric: value}, prediction lines) of ``model`` (a Llama, its adapter active; with
    ``head``, a classifier with ``labels``) on ``examples``.  ``encoded``: the examples'
    ``sft.encode`` pairs when the caller has them.  ValueError when a metric does not apply."""
    import torch
    import torch.nn.functional as F

    from llmosd.train import sft
    metrics = tuple(metrics)
    max_len = block_size if head is not None else block_size + 1
    if encoded is None:
        encoded = [sft.encode(tok, ex, max_len=max_len) for ex in examples]
    out, preds = {}, []
    if head is not None:
        want = [labels.index(ex.label) if ex.label in labels else None for ex in examples]
        if any(w is None for w in want) and set(metrics) & set(LOSS_METRICS + CLASS_METRICS):
            bad = next(ex for ex, w in zip(examples, want) if w is None)
            raise ValueError(f"{bad.where}: label {bad.label!r} is not one of the classifier's "
                             f"labels ({', '.join(labels)})")
        total, got = 0.0, []
        for (ids, _), w in zip(encoded, want):
            logits = class_logits(model, head, ids, device)
            total += float(F.cross_entropy(logits[None].float(), torch.tensor([w], device=logits.device)))
            got.append(int(logits.argmax()))
        pred = [labels[g] for g in got]
        gold = [ex.label for ex in examples]
        preds = [{"input": ex.text, "gold": g, "pred": p} for ex, g, p in zip(examples, gold, pred)]
        loss = total / max(1, len(examples))
        out.update(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                   accuracy=sft.accuracy(pred, gold), f1=sft.macro_f1(pred, gold, labels))
        return {k: out[k] for k in metrics if k in out}, preds
    if head is None and set(metrics) & set(CLASS_METRICS):
        from llmosd.serve.evaluate import classify      # zero-shot: the next-token probabilities
        with torch.no_grad():
            got = classify(model, tok, device, inputs=[ex.text for ex in examples], labels=labels)
        pred, gold = [r["label"] for r in got["results"]], [ex.label for ex in examples]
        preds = [{"input": ex.text, "gold": g, "pred": p} for ex, g, p in zip(examples, gold, pred)]
        out.update(accuracy=sft.accuracy(pred, gold), f1=sft.macro_f1(pred, gold, labels))
    if set(metrics) & set(LOSS_METRICS):
        total, count = lm_loss_sum(model, encoded, batch_size, device, amp)
        if count == 0:
            raise ValueError(f"the {len(examples):,} examples have no answer tokens within "
                             f"block_size {block_size:,}: raise block_size or shorten the prompts")
        loss = total / count
        out.update(loss=loss, perplexity=math.exp(min(loss, 700.0)))
    if set(metrics) & set(GEN_METRICS):
        stop = stop_ids(tok, model.config)
        pred, gold = [], []
        for ex in examples[:eval_samples]:
            prompt, answer = sft.generation_prompt(tok, ex)
            limit = len(tok.encode(answer, add_bos=False)) + EXTRA_NEW_TOKENS
            text = tok.decode(greedy(model, prompt, limit, stop, device))
            pred.append(text)
            gold.append(answer)
            preds.append({"input": input_text(ex), "gold": answer, "pred": text})
        out.update(exact_match=sft.exact_match(pred, gold), chrf=sft.chrf(pred, gold))
    missing = [k for k in metrics if k not in out]
    if missing:
        raise ValueError(f"metric {missing[0]} does not apply to this model and data")
    return {k: out[k] for k in metrics}, preds


def write_predictions(path: str, preds: list[dict]) -> None:
    """The prediction lines as JSONL at ``path``, replaced atomically (a reader sees the last
    evaluation's file whole)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in preds:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_for_eval(store, man: dict, base: dict | None, device):
    """(model, tokenizer, head, labels) of a stored model: a full model, or an adapter or
    classifier installed on its base (``base``: the base's manifest), its adapter active."""
    from llmosd.models import lora
    from llmosd.models.loader import load_model
    from llmosd.store.manifest import base_of
    if base_of(man) is not None:
        if not base:
            raise ValueError("the adapter's base model is not given")
        model, tok = load_model(store, base, device)
    else:
        model, tok = load_model(store, man, device)
    head = labels = None
    if man.get("adapter") or man.get("head"):
        ad = lora.read_adapter(store, man, "evaluated")
        if base_of(man) is None and ad.lora is not None:
            raise ValueError("a model with its own weights and LoRA tensors cannot be evaluated")
        lora.install(model, ad, device)
        if ad.lora is not None:
            lora.set_active(model, ad.key)
        head, labels = ad.head, ad.labels
    return model.eval(), tok, head, labels


def model_facts(store, man: dict, base: dict | None) -> dict:
    """What ``check_eval_spec`` needs to know of the evaluated model."""
    from llmosd.store.manifest import kind_of
    cfg = json.loads(store.read_blob(man["config"]["digest"]))
    template = man.get("chat_template") or (base or {}).get("chat_template")
    return {"kind": kind_of(man), "labels": (man.get("head") or {}).get("labels"),
            "has_template": bool(template), "context": cfg.get("max_position_embeddings")}


def eval_metrics(asked, classifier: bool) -> list[str]:
    """The metrics ``eval`` computes: those asked for, and for a classifier its loss and
    perplexity too (its head's cross entropy per example, computed with its predictions at no
    extra cost; labelled data has no token targets, so they cannot be asked for by name)."""
    asked = list(asked)
    return ([m for m in LOSS_METRICS if m not in asked] + asked) if classifier else asked


def run_eval(spec: dict, store_root: str, ctl) -> dict:
    """Job function of ``llmctl eval``: the metrics of ``spec["model"]`` on ``spec["data"]``;
    returns {"model", "examples", "metrics", "predictions_file"}."""
    import torch

    from llmosd.store.store import Store
    from llmosd.train import sft
    from llmosd.train.pretrain import amp_dtype, pick_device, user_spec
    from llmosd.train.ftspec import check_eval_spec
    store = Store(store_root)
    man, base = spec["_model"], spec.get("_base")
    ctl.progress({"stage": "data", "message": f"reading {len(spec['data'])} data file(s)"})
    data = {name: store.read_blob(d) for name, d in spec["data"].items()}
    # the daemon checked it at submit; again here (the check is idempotent)
    s = check_eval_spec({k: v for k, v in user_spec(spec).items() if k != "model"}, data,
                        model_facts(store, man, base))
    examples = sft.parse_examples(data)
    device = pick_device(s.get("device", "auto"))
    torch.manual_seed(s.get("seed", 0))
    ctl.progress({"stage": "load", "message": f"loading {spec['model']}"})
    model, tok, head, labels = load_for_eval(store, man, base, device)
    ctl.progress({"stage": "eval", "message": f"evaluating {len(examples):,} examples"})
    figures, preds = evaluate(model, tok, examples, metrics=eval_metrics(s["metrics"], head is not None),
                              block_size=s["block_size"],
                              batch_size=s["batch_size"], eval_samples=s["eval_samples"],
                              device=device, amp=amp_dtype("auto", device), head=head,
                              labels=labels if head is not None else s.get("labels"))
    out = {"model": spec["model"], "examples": len(examples), "metrics": figures}
    if preds and getattr(ctl, "job_dir", None):
        path = os.path.join(ctl.job_dir, "predictions.jsonl")
        write_predictions(path, preds)
        out["predictions_file"] = path
    ctl.log("  ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    return out
