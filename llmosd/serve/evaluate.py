"""One-shot model evaluations the engine runs beside generation steps: score, embed, classify
(zero-shot, from the language model's next-token probabilities) and classify_head (a trained
classifier's head: the runner passes the installed ``head`` and its ``trained`` labels).

Each is a generator ``STEPS[name]`` (``score_steps`` ...)
``(model, tokenizer, device, *, slice_tokens=None, **args)`` that runs one forward pass of at most ``slice_tokens`` tokens per ``next()`` (None: a whole
score window or input per pass), yields the tokens it took, and returns the result dict; the
engine advances a call a slice per step, so a long score never stops the generations of the
instance.  A window or input longer than a slice is prefilled chunk by chunk through a KV
cache of its own (at most one context), so the results equal a single pass's (to float
rounding).  ``FUNCTIONS[name](model, tokenizer, device, *, should_stop=None, **args)`` runs
one to its end (also as ``score``, ``embed``, ...), checking ``should_stop()`` between
passes (``Stopped``).
Input the model cannot take raises ``ValueError`` (the engine turns it into InvalidArgument).
Replies stay well under the protocol's message limit: score refuses texts over
MAX_SCORE_TOKENS and embed batches over MAX_EMBED_BYTES up front, saying how to split them.
Shapes: T tokens, C model width, V vocabulary, L labels.
"""
from __future__ import annotations

import math
from typing import Callable, Generator

import numpy as np
import torch

from llmosd.models.classifier import head_logits
from llmosd.models.llama import KVCache
from llmosd.serve.request import check_head_labels

CHUNK = 512        # positions per lm_head call: bounds the (T, V) logits held at once
MAX_SCORE_TOKENS = 65_536     # ~40 bytes of reply per token: ~2.6 MB, far below 16 MiB
MAX_EMBED_BYTES = 8 << 20     # float32 vectors in one embed reply

StopCheck = Callable[[], bool] | None
Steps = Generator[int, None, dict]


class Stopped(Exception):
    """The engine is stopping; the call was abandoned."""


def _check(should_stop: StopCheck) -> None:
    if should_stop is not None and should_stop():
        raise Stopped()


def _cache(model, positions: int, device, batch: int = 1) -> KVCache:
    """A call's own KV cache, in the activations' dtype (the norms'; linears may be quantized)."""
    return KVCache(model.config, positions, batch, device, model.model.norm.weight.dtype)


def _hidden_slices(model, x: torch.Tensor, limit: int | None, cache: KVCache | None = None):
    """x (B, T) at positions 0..T-1 -> yields (c0, h (B, t, C)) per forward pass: one pass
    without a cache when T fits ``limit`` (or no limit), else chunks of ``limit`` through
    ``cache`` (made here when None)."""
    T = x.shape[1]
    if limit is None or T <= limit:
        yield 0, model.hidden(x)
        return
    cache = cache if cache is not None else _cache(model, T, x.device, x.shape[0])
    for c0 in range(0, T, limit):
        yield c0, model.hidden(x[:, c0:c0 + limit], cache, c0)

DEFAULT_CLASSIFY_TEMPLATE = ("Classify the text into one of these labels: {labels}.\n"
                             "Text: {text}\nLabel:")


def _ids(model, tok, text: str, add_bos: bool) -> list[int]:
    ids = tok.encode(text, add_bos=add_bos)
    ctx = model.config.max_position_embeddings
    if len(ids) > ctx:
        raise ValueError(f"the text is {len(ids)} tokens, more than the model's context of {ctx}")
    return ids


def _logprobs_of(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h (T, C) hidden states, targets (T,) ids -> (T,) log p(target | position) in float32."""
    out = []
    for s in range(0, h.shape[0], CHUNK):
        logits = model.lm_head(model.model.norm(h[s:s + CHUNK])).float()      # (t, V)
        out.append(logits.log_softmax(-1).gather(1, targets[s:s + CHUNK, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def score_steps(model, tok, device, *, text: str, add_bos: bool = True,
                slice_tokens: int | None = None) -> Steps:
    """Per-token log-probabilities of ``text`` and its perplexity (exp of the mean negative
    log-likelihood of every token after the first, as Hugging Face computes it).

    Text longer than the context is scored in windows of the context's length that overlap
    by half (Hugging Face's strided perplexity): each token is scored once, with at least
    half a context of the text before it in view.  At most MAX_SCORE_TOKENS tokens: the reply
    lists every one."""
    ids = tok.encode(text, add_bos=add_bos)
    n, ctx = len(ids), model.config.max_position_embeddings
    if n < 2:
        raise ValueError("the text must be at least two tokens long to be scored")
    if n > MAX_SCORE_TOKENS:
        raise ValueError(f"the text is {n:,} tokens; score takes at most {MAX_SCORE_TOKENS:,} tokens "
                         f"per request (the reply lists every token): split the text into parts "
                         f"of at most {MAX_SCORE_TOKENS:,} tokens and score each")
    lp, start, done, windows = [], 0, 1, 0         # done: index of the next token to score
    cache = None                                    # one for every window that needs slicing
    while done < n:
        end = min(n, start + ctx)
        x = torch.tensor([ids[start:end]], device=device)
        if slice_tokens is not None and end - start > slice_tokens and cache is None:
            cache = _cache(model, min(n, ctx), device)
        for c0, h in _hidden_slices(model, x, slice_tokens, cache):
            # row r of the window predicts ids[start + r + 1]; rows done-start-1 .. end-start-2 count
            lo, hi = max(c0, done - start - 1), min(c0 + h.shape[1], end - start - 1)
            if hi > lo:
                lp += _logprobs_of(model, h[0, lo - c0:hi - c0], x[0, lo + 1:hi + 1]).cpu().tolist()
            yield h.shape[1]
        done, start, windows = end, max(0, end - ctx // 2), windows + 1
    nll = -sum(lp) / len(lp)
    tokens = [{"id": ids[0], "text": tok.decode([ids[0]]), "logprob": None}]
    tokens += [{"id": i, "text": tok.decode([i]), "logprob": v} for i, v in zip(ids[1:], lp)]
    return {"tokens": tokens, "scored_tokens": len(lp), "logprob": sum(lp), "mean_nll": nll,
            "perplexity": math.exp(nll), "windows": windows}


def embed_steps(model, tok, device, *, inputs: list[str], pooling: str = "mean",
          normalize: bool = True, slice_tokens: int | None = None) -> Steps:
    """One vector per input: the final normalized hidden states pooled over the input's tokens
    (``mean``: average over every token; ``last``: the last token's state), L2-normalized
    unless ``normalize`` is false.  Returned as float32 little-endian rows."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    size = len(inputs) * model.config.hidden_size * 4
    if size > MAX_EMBED_BYTES:
        most = max(1, MAX_EMBED_BYTES // (model.config.hidden_size * 4))
        raise ValueError(f"{len(inputs)} vectors of {model.config.hidden_size} floats make a reply of "
                         f"{size:,} bytes, more than {MAX_EMBED_BYTES:,}: embed at most {most} inputs per request")
    rows, counts = [], []
    for text in inputs:
        ids = _ids(model, tok, text, True)
        if not ids:
            raise ValueError("an input is empty; every line needs at least one token")
        sums, last = [], None
        for _, h in _hidden_slices(model, torch.tensor([ids], device=device), slice_tokens):
            h = model.model.norm(h)[0].float()                              # (t, C)
            sums.append(h.mean(0) if len(ids) == h.shape[0] else h.sum(0))
            last = h[-1]
            yield h.shape[0]
        if pooling == "mean":
            v = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0) / len(ids)
        else:
            v = last
        if normalize:
            v = v / v.norm().clamp_min(1e-12)
        rows.append(v.cpu())
        counts.append(len(ids))
    arr = torch.stack(rows).numpy().astype("<f4") if rows else np.zeros((0, model.config.hidden_size), "<f4")
    return {"count": len(rows), "dim": int(arr.shape[1]), "dtype": "float32", "data": arr.tobytes(),
            "tokens": counts, "pooling": pooling, "normalized": normalize}


def classify_steps(model, tok, device, *, inputs: list[str], labels: list[str],
             template: str | None = None, slice_tokens: int | None = None) -> Steps:
    """Zero-shot: each input gets the label whose tokens are most likely after the prompt
    ``template`` (with {text} and {labels}); ``scores`` are the labels' summed log-probs,
    ``probs`` their softmax over the labels."""
    template = template or DEFAULT_CLASSIFY_TEMPLATE
    if "{text}" not in template:
        raise ValueError("the classification template must contain {text}")
    if len(set(labels)) != len(labels) or len(labels) < 2:
        raise ValueError("give at least two distinct labels")
    label_ids = [tok.encode(" " + lab.strip(), add_bos=False) for lab in labels]
    results = []
    for text in inputs:
        prompt = template.replace("{labels}", ", ".join(labels)).replace("{text}", text)
        prefix = _ids(model, tok, prompt, True)
        longest = max(map(len, label_ids))
        if len(prefix) + longest > model.config.max_position_embeddings:
            raise ValueError("an input is too long for the model's context")
        if slice_tokens is None or len(labels) * (len(prefix) + longest) <= slice_tokens:
            scores = _label_scores_at_once(model, prefix, label_ids, longest, device)
            yield len(labels) * (len(prefix) + longest)
        else:
            scores = yield from _label_scores_sliced(model, prefix, label_ids, longest, device,
                                                     slice_tokens)
        probs = torch.tensor(scores).softmax(0).tolist()
        best = max(range(len(labels)), key=lambda j: scores[j])
        results.append({"label": labels[best], "scores": dict(zip(labels, scores)),
                        "probs": dict(zip(labels, probs))})
    return {"results": results}


def _label_scores_at_once(model, prefix, label_ids, longest, device) -> list[float]:
    """Every label after ``prefix`` in one pass: (L, P + longest) rows, right-padded (causal
    attention keeps padding out of real positions)."""
    rows = [prefix + ids + [0] * (longest - len(ids)) for ids in label_ids]
    x = torch.tensor(rows, device=device)
    logits = model(x)[:, len(prefix) - 1:-1].log_softmax(-1)               # (L, longest, V)
    scores = []
    for j, ids in enumerate(label_ids):
        t = torch.tensor(ids, device=device)
        scores.append(float(logits[j, torch.arange(len(ids), device=device), t].sum()))
    return scores


def _label_scores_sliced(model, prefix, label_ids, longest, device, limit: int) -> Steps:
    """The same scores, no pass over ``limit`` tokens: the prefix prefilled once in chunks,
    then the labels' tokens (all but their last) in groups of rows over copies of its cache."""
    P = len(prefix)
    pc = _cache(model, P, device)
    for _, h in _hidden_slices(model, torch.tensor([prefix], device=device), limit, pc):
        yield h.shape[1]
    # the prefix's last position predicts every label's first token
    first = model.lm_head(model.model.norm(h[:, -1])).float().log_softmax(-1)[0]     # (V,)
    scores = [float(first[ids[0]]) for ids in label_ids]
    if longest == 1:
        return scores
    per = max(1, limit // (longest - 1))
    for g0 in range(0, len(label_ids), per):
        group = label_ids[g0:g0 + per]
        cache = _cache(model, P + longest - 1, device, len(group))
        for layer in range(len(cache.k)):
            cache.k[layer][:, :, :P] = pc.k[layer][:, :, :P]
            cache.v[layer][:, :, :P] = pc.v[layer][:, :, :P]
        x = torch.tensor([ids[:-1] + [0] * (longest - len(ids)) for ids in group], device=device)
        lg = model(x, cache, P).log_softmax(-1)                            # (G, longest-1, V)
        for j, ids in enumerate(group):
            t = torch.tensor(ids[1:], device=device)
            scores[g0 + j] += float(lg[j, torch.arange(len(ids) - 1, device=device), t].sum())
        yield len(group) * (longest - 1)
    return scores


def classify_head_steps(model, tok, device, *, head: torch.Tensor, trained: list[str], inputs: list[str],
                  labels: list[str] | None = None, max_len: int | None = None,
                  slice_tokens: int | None = None) -> Steps:
    """A trained classifier: each input's logits from ``head`` on the final normalized hidden
    state of its last token (``classifier.head_logits``), one input at a time so that the
    result equals the fine-tuning job's validation predictions.  The input is encoded as the
    job encodes it (the tokenizer's default BOS) and cut to ``max_len`` tokens (the job's
    block size; default the context).  ``scores`` are the logits, ``probs`` their softmax;
    the label is the first of the highest (in trained order), as argmax picks it."""
    order = check_head_labels(trained, labels)
    limit = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    results = []
    for text in inputs:
        ids = tok.encode(text)[:limit]
        if not ids:
            raise ValueError("an input is empty; every line needs at least one token")
        if slice_tokens is None or len(ids) <= slice_tokens:
            logits = head_logits(model, head, [ids], device)[0].float().cpu()          # (L,)
            yield len(ids)
        else:
            for _, h in _hidden_slices(model, torch.tensor([ids], device=device), slice_tokens):
                yield h.shape[1]
            pooled = model.model.norm(h[:, -1])                                           # (1, C)
            logits = (pooled.float() @ head.to(device, torch.float32).T)[0].cpu()
        probs = logits.softmax(0)
        best = int(logits.argmax())
        j = {lab: i for i, lab in enumerate(trained)}
        results.append({"label": trained[best], "scores": {lab: float(logits[j[lab]]) for lab in order},
                        "probs": {lab: float(probs[j[lab]]) for lab in order}})
    return {"results": results}


STEPS = {"score": score_steps, "embed": embed_steps, "classify": classify_steps,
         "classify_head": classify_head_steps}


def run_to_end(steps: Steps, should_stop: StopCheck = None) -> dict:
    """Drive a call's generator to its result, checking ``should_stop`` before each pass."""
    while True:
        _check(should_stop)
        try:
            next(steps)
        except StopIteration as e:
            return e.value


def _whole(fn):
    def run(model, tok, device, *, should_stop: StopCheck = None, **args) -> dict:
        return run_to_end(fn(model, tok, device, **args), should_stop)
    run.__name__, run.__doc__ = fn.__name__.removesuffix("_steps"), fn.__doc__
    return run


score, embed = _whole(score_steps), _whole(embed_steps)
classify, classify_head = _whole(classify_steps), _whole(classify_head_steps)
FUNCTIONS = {"score": score, "embed": embed, "classify": classify, "classify_head": classify_head}
