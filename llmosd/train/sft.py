"""Supervised fine-tuning data: JSONL examples -> token ids with a loss mask -> batches, and the
metrics of its evaluations.

- ``parse_examples``: JSONL files (one object per line) of one of four kinds:
  ``{"prompt", "completion"}`` (completion), ``{"messages": [{role, content}, ...]}`` (chat, the
  last message the assistant's), ``{"text"}`` (text) or ``{"text", "label"}`` (label, for
  classifiers); other keys of a line are ignored.  A bad line raises ValueError naming its file
  and line number and the fix.
- ``check_examples`` / ``split_examples``: the data fits the method; a seeded validation split.
- ``encode``: an example's ids and a same-length mask, ``mask[i] = 1`` when ``ids[i]`` is a
  training target (predicted from ``ids[:i]``): the completion, the assistant turns, all of a
  text; never a prompt, a user or system turn, a generation prompt, a leading BOS.
- ``batch_indices``: which examples a micro-batch holds, a pure function of (seed, step, micro,
  rank) over epoch-wise shuffles, so a resumed run sees the batches it would have seen and N
  ranks of batch b see what one process of batch N*b sees.
- ``accuracy``, ``macro_f1``, ``exact_match``, ``chrf`` (sacrebleu's chrF).

Torch-free (numpy, jinja2 and sacrebleu imported where used): ``train.spec`` parses data with
it on the daemon's loop.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

from llmosd.serve.chat import TemplateError, check_messages, render
from llmosd.train.data import decode_text

KINDS = ("completion", "chat", "text", "label")
SHUFFLE, HOLDOUT = 3, 4      # seed streams (train.data uses 0..2)
FORMATS = ('{"prompt": ..., "completion": ...}, {"messages": [{"role": ..., "content": ...}, ...]}, '
           '{"text": ...} or {"text": ..., "label": ...}')
# the fields that decide a line's kind (any other key of a line is metadata and ignored)
_FIELDS = {frozenset({"prompt", "completion"}): "completion", frozenset({"messages"}): "chat",
           frozenset({"text"}): "text", frozenset({"text", "label"}): "label"}
_DESCRIBE = {"completion": "prompt/completion", "chat": "chat (messages)", "text": "text",
             "label": "labelled text"}


@dataclass(frozen=True)
class Example:
    """One training example; ``where`` names its origin ("train.jsonl line 3") for messages.
    ``messages`` is a tuple of {"role", "content"} dicts."""
    kind: str
    prompt: str = ""
    completion: str = ""
    messages: tuple = ()
    text: str = ""
    label: str | None = None
    where: str = ""


# ---- parsing ---------------------------------------------------------------------------------

def _string(where: str, obj: dict, key: str, empty_ok: bool = False) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise ValueError(f"{where}: \"{key}\" must be a string, not {type(v).__name__}")
    if not v and not empty_ok:
        raise ValueError(f"{where}: \"{key}\" is empty; give it some text or remove the line")
    return v


def parse_line(where: str, obj) -> Example:
    """One JSONL line's object as an Example; ValueError naming ``where`` and the fix."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: each line must be a JSON object, one of {FORMATS}")
    kind = _FIELDS.get(frozenset(k for k in ("prompt", "completion", "messages", "text", "label")
                                 if k in obj))
    if kind is None:
        given = ", ".join(sorted(str(k) for k in obj)) or "no fields"
        raise ValueError(f"{where}: a line must be one of {FORMATS}; this one has {given}")
    if kind == "completion":
        return Example(kind, prompt=_string(where, obj, "prompt", empty_ok=True),
                       completion=_string(where, obj, "completion"), where=where)
    if kind == "chat":
        try:
            msgs = check_messages(obj["messages"])
        except TemplateError as e:
            raise ValueError(f"{where}: {e}") from None
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's (the answer to "
                             f"learn), not the {msgs[-1]['role']}'s; end the conversation with it")
        return Example(kind, messages=tuple(msgs), where=where)
    text = _string(where, obj, "text")
    if kind == "text":
        return Example(kind, text=text, where=where)
    label = obj["label"]
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)                     # datasets often number their classes
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{where}: \"label\" must be a non-empty string (or an integer), "
                         f"got {label!r:.40}")
    return Example(kind, text=text, label=label, where=where)


def parse_file(name: str, data: bytes | str) -> list[Example]:
    """The examples of one JSONL file (blank lines skipped)."""
    out = []
    for n, line in enumerate(decode_text(name, data).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            hint = ("" if name.lower().endswith((".jsonl", ".json", ".ndjson")) else
                    "; fine-tuning takes JSONL files (one JSON object per line, "
                    f"{FORMATS}); plain text trains with `llmctl train`")
            raise ValueError(f"{where}: not valid JSON ({e}){hint}") from None
        out.append(parse_line(where, obj))
    return out


def parse_examples(data: dict[str, bytes | str]) -> list[Example]:
    """Every example of the data files, files in name order (the order given does not matter).
    All examples of one dataset have one kind; ValueError at the first line of another kind,
    for a bad line (with its file and line number), or when there are no examples."""
    if not isinstance(data, dict) or not data:
        raise ValueError("no data files: give at least one JSONL file")
    out: list[Example] = []
    for name in sorted(data):
        for ex in parse_file(name, data[name]):
            if out and ex.kind != out[0].kind:
                raise ValueError(f"{ex.where}: a {_DESCRIBE[ex.kind]} example, but the data before "
                                 f"it holds {_DESCRIBE[out[0].kind]} examples (from "
                                 f"{out[0].where}); one dataset holds one format: convert the "
                                 "line or put it in another fine-tune")
            out.append(ex)
    if not out:
        raise ValueError(f"the data files ({', '.join(sorted(data))}) hold no examples; give JSONL "
                         f"lines like {FORMATS}")
    return out


def dataset_kind(examples) -> str:
    """The kind every example of ``examples`` has (ValueError when there are none)."""
    if not examples:
        raise ValueError("the data holds no examples")
    return examples[0].kind


def check_examples(examples, method: str, labels: list[str] | None, has_template: bool) -> list[str]:
    """Check that ``examples`` fit ``method`` (full, lora, classify) and return the label list:
    for classify ``labels`` as given, or else the data's labels sorted; [] for other methods.
    ValueError for classify without label data, label data without classify, labels given to
    another method, a data label not in ``labels`` (named with its line), a label of ``labels``
    with no example, fewer than 2 labels, or chat data when the model has no chat template."""
    kind = dataset_kind(examples)
    if method == "classify" and kind != "label":
        raise ValueError(f"--method classify needs labelled examples {{\"text\", \"label\"}}; the "
                         f"data holds {_DESCRIBE[kind]} examples (from {examples[0].where}): add "
                         "labels, or fine-tune with --method lora or full")
    if kind == "label" and method != "classify":
        raise ValueError(f"the data holds labelled examples {{\"text\", \"label\"}} (from "
                         f"{examples[0].where}): they train a classifier; use --method classify")
    if labels and method != "classify":
        raise ValueError("labels apply to --method classify only; leave them out")
    if kind == "chat" and not has_template:
        raise ValueError(f"the data holds chat examples {{\"messages\"}} (from {examples[0].where}) "
                         "but the model has no chat template to render them; use "
                         "{\"prompt\", \"completion\"} data or a base model with a chat template")
    if method != "classify":
        return []
    seen: dict[str, str] = {}
    for ex in examples:
        seen.setdefault(ex.label, ex.where)
    if labels:
        dup = [lb for i, lb in enumerate(labels) if lb in labels[:i]]
        if dup:
            raise ValueError(f"label {dup[0]!r} is given twice in --labels")
        known = set(labels)
        for ex in examples:
            if ex.label not in known:
                raise ValueError(f"{ex.where}: label {ex.label!r} is not one of --labels "
                                 f"{', '.join(labels)}; add it to --labels or fix the line")
        missing = [lb for lb in labels if lb not in seen]
        if missing:
            raise ValueError(f"label {missing[0]!r} of --labels has no example in the data; add "
                             "examples of it or leave it out of --labels")
        out = list(labels)
    else:
        out = sorted(seen)
    if len(out) < 2:
        raise ValueError(f"a classifier needs at least 2 labels; the data has only {out[0]!r}: "
                         "add examples of another label")
    return out


def split_examples(examples, seed: int, val: list | None) -> tuple[list, list]:
    """(train, validation).  With ``val`` (from --val-data): all of ``examples`` train.  Else a
    seeded draw holds out max(1, 10%) of them; both keep the data's order.  ValueError with
    fewer than 2 examples and no ``val``."""
    examples = list(examples)
    if val:
        return examples, list(val)
    n = len(examples)
    if n < 2:
        raise ValueError(f"the data has {n} example{'' if n == 1 else 's'}: fine-tuning needs at "
                         "least 2 (a tenth, at least one, is held out for validation); add "
                         "examples or give validation data (--val-data)")
    import numpy as np
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, HOLDOUT])))
    held = set(rng.permutation(n)[:max(1, n // 10)].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# ---- tokens and masks ------------------------------------------------------------------------

def chat_segments(template, messages, **specials) -> list[tuple[str, bool]]:
    """The rendered conversation cut into pieces that concatenate to it, True for each
    assistant piece: its content plus whatever end-of-turn text the template writes after it.
    The first piece starts the conversation (with any BOS the template writes); the text before
    each assistant piece ends with the generation prompt.  ValueError (TemplateError) when the
    template does not render a conversation's beginning as a prefix of the whole."""
    msgs = [dict(m) for m in messages]
    pieces, done = [], ""

    def after(text: str, prefix: str, i: int) -> str:
        if not text.startswith(prefix):
            raise TemplateError(f"the chat template renders the conversation up to message {i} "
                                "differently from its start within the whole conversation, so "
                                "the assistant's tokens cannot be told apart; use "
                                "{\"prompt\", \"completion\"} data")
        return text[len(prefix):]

    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = render(template, msgs[:i], add_generation_prompt=True, **specials)
        full = render(template, msgs[:i + 1], add_generation_prompt=False, **specials)
        pieces.append((after(prompt, done, i), False))
        pieces.append((after(full, prompt, i), True))
        done = full
    if not msgs or msgs[-1]["role"] != "assistant":
        pieces.append((after(render(template, msgs, add_generation_prompt=False, **specials),
                             done, len(msgs)), False))
    return [(t, a) for t, a in pieces if t]


def _specials(tok, specials) -> dict:
    if specials is not None:
        return dict(specials)
    return {"bos_token": tok.token(tok.bos_id), "eos_token": tok.token(tok.eos_id)}


def _eos(tok) -> list[int]:
    return [tok.eos_id] if tok.eos_id is not None else []


def encode(tok, ex: Example, *, max_len: int, template=None, specials=None) -> tuple[list[int], list[int]]:
    """``ex``'s token ids and a same-length mask (1: the token is trained), cut to ``max_len``
    on the right.  completion: the prompt as prompts encode (the tokenizer's own BOS rule) then
    the completion and EOS, masked in; chat: the ``chat_segments`` encoded one by one (the
    template writes any BOS), the assistant pieces masked in; text: everything but a leading
    BOS, plus EOS; label: the text as prompts encode, all masked out (a classifier's head
    reads the last token).  ``template`` defaults to the tokenizer's chat template and
    ``specials`` to its BOS/EOS pieces, as serving renders chats."""
    if ex.kind == "completion":
        p = tok.encode(ex.prompt, add_bos=True)
        c = tok.encode(ex.completion, add_bos=False) + _eos(tok)
        ids, mask = p + c, [0] * len(p) + [1] * len(c)
    elif ex.kind == "chat":
        template = template or getattr(tok, "chat_template", None)
        ids, mask = [], []
        for text, trained in chat_segments(template, ex.messages, **_specials(tok, specials)):
            part = tok.encode(text, add_bos=False)
            ids += part
            mask += [int(trained)] * len(part)
    elif ex.kind == "text":
        ids = tok.encode(ex.text, add_bos=True) + _eos(tok)
        mask = [1] * len(ids)
        if ids and tok.bos_id is not None and ids[0] == tok.bos_id:
            mask[0] = 0
    elif ex.kind == "label":
        ids = tok.encode(ex.text, add_bos=True)
        mask = [0] * len(ids)
    else:
        raise ValueError(f"unknown example kind {ex.kind!r}")
    return ids[:max_len], mask[:max_len]


def generation_prompt(tok, ex: Example, template=None, specials=None) -> tuple[list[int], str]:
    """(prompt ids, gold answer) of a greedy evaluation: completion -> the prompt as ``encode``
    writes it and the completion; chat -> the conversation before the last message with the
    generation prompt, and the last assistant message's content."""
    if ex.kind == "completion":
        return tok.encode(ex.prompt, add_bos=True), ex.completion
    if ex.kind == "chat":
        template = template or getattr(tok, "chat_template", None)
        text = render(template, list(ex.messages[:-1]), add_generation_prompt=True,
                      **_specials(tok, specials))
        return tok.encode(text, add_bos=False), ex.messages[-1]["content"]
    raise ValueError(f"{ex.where or 'the example'}: {_DESCRIBE.get(ex.kind, ex.kind)} examples have "
                     "no answer to generate; exact match and chrF need prompt/completion or chat data")


# ---- batches ---------------------------------------------------------------------------------

def steps_for(n_train: int, epochs: float, batch: int, grad_accum: int, world: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_train`` examples (at least 1), each step
    taking batch * grad_accum * world examples."""
    per_step = batch * grad_accum * world
    return max(1, math.ceil(epochs * n_train / per_step - 1e-9))


@functools.lru_cache(maxsize=8)
def _order(n: int, seed: int, epoch: int):
    import numpy as np
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SHUFFLE, epoch])))
    order = rng.permutation(n)
    order.flags.writeable = False
    return order


def batch_indices(n: int, batch: int, seed: int, step: int, micro: int, grad_accum: int,
                  rank: int = 0, world: int = 1) -> list[int]:
    """Indices (into the ``n`` training examples) of rank ``rank``'s ``batch`` examples of
    optimizer step ``step``, micro-step ``micro``.  Example positions run on through epochs
    (global position g = ((step * grad_accum + micro) * world + rank) * batch + i), each epoch
    a seeded shuffle of all ``n``, so every example comes once per epoch.  Pure."""
    if n < 1:
        raise ValueError("no training examples")
    first = ((step * grad_accum + micro) * world + rank) * batch
    out = []
    for g in range(first, first + batch):
        epoch, pos = divmod(g, n)
        out.append(int(_order(n, seed, epoch)[pos]))
    return out


# ---- metrics ---------------------------------------------------------------------------------

def _pairs(pred, gold) -> tuple[list, list]:
    pred, gold = list(pred), list(gold)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} references")
    return pred, gold


def accuracy(pred, gold) -> float:
    """The fraction of predictions equal to their reference (0.0 for none)."""
    pred, gold = _pairs(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else 0.0


def macro_f1(pred, gold, labels) -> float:
    """The mean over ``labels`` of each label's F1 = 2TP / (2TP + FP + FN), 0 for a label
    neither predicted nor present (scikit-learn's f1_score(average="macro", labels=labels))."""
    pred, gold = _pairs(pred, gold)
    labels = list(labels)
    if not labels:
        return 0.0
    total = 0.0
    for lb in labels:
        tp = sum(p == lb and g == lb for p, g in zip(pred, gold))
        fp = sum(p == lb and g != lb for p, g in zip(pred, gold))
        fn = sum(p != lb and g == lb for p, g in zip(pred, gold))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(labels)


def exact_match(pred, gold) -> float:
    """The fraction of predictions equal to their reference, both stripped of outer blanks."""
    pred, gold = _pairs(pred, gold)
    return sum(p.strip() == g.strip() for p, g in zip(pred, gold)) / len(gold) if gold else 0.0


def chrf(pred, gold) -> float:
    """sacrebleu's corpus chrF (character 6-grams, beta 2) of the predictions against one
    reference each, 0..100 (0.0 for none)."""
    pred, gold = _pairs(pred, gold)
    if not gold:
        return 0.0
    from sacrebleu.metrics import CHRF
    return float(CHRF().corpus_score(pred, [gold]).score)
