"""Training data: blobs -> documents -> a tokenizer -> one packed token stream -> batches.

- ``documents``: text files (one document each) and JSONL files (``{"text": ...}`` per line);
  a file that is not UTF-8 or a bad JSONL line raises ValueError naming the file and line.
- ``train_tokenizer``: SentencePiece ``bpe`` / ``unigram`` (byte fallback) or ``char`` (one
  piece per character, comparable with classic character-level baselines).
- ``pack``: every document's tokens followed by end-of-text, concatenated into one stream;
  ``split``: its last tenth validates (as nanoGPT), the rest trains.
- ``train_batch`` / ``val_batch``: fixed-length blocks cut from the stream at random offsets,
  a pure function of (seed, step, micro-step) for the global batch, of which rank r takes the
  r-th share, so a run resumed at a step sees exactly the batches it would have seen, and N
  ranks of batch b see what one process of batch N*b sees.

Torch-free (numpy arrays out; numpy is imported where used): ``train.spec`` parses data with
``documents`` on the daemon's loop, so this imports nothing of llmosd at its top.
"""
from __future__ import annotations

import json

TRAIN, VAL, DROPOUT = 0, 1, 2     # stream tags in the seeds
VAL_FRACTION = 0.1         # the last tenth of the stream validates (``split_at``), as nanoGPT


def decode_text(name: str, data: bytes | str) -> str:
    """A file's bytes as text (text is taken as it is); ValueError naming the file when they
    are not UTF-8."""
    if isinstance(data, str):
        return data.removeprefix("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (bad byte at offset {e.start:,}); training data "
                         "must be text or JSONL files") from None


def parse_jsonl(name: str, text: str) -> list[str]:
    """The ``text`` of each non-blank line of a JSONL file; ValueError with the line number."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{name} line {n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{name} line {n}: each line must be a JSON object with a string "
                             "\"text\" field, like {\"text\": \"...\"}")
        out.append(obj["text"])
    return out


def documents(data: dict[str, bytes | str]) -> list[str]:
    """The documents of the data files, files in name order (the order given does not matter),
    empty documents left out.  ``*.jsonl`` files hold one document per line; others are text."""
    docs = []
    for name in sorted(data):
        text = decode_text(name, data[name])
        docs.extend(parse_jsonl(name, text) if name.lower().endswith(".jsonl") else [text])
    return [d for d in docs if d]


def train_tokenizer(docs: list[str], kind: str, vocab_size: int | None, seed: int) -> bytes:
    """A serialized SentencePiece model of ``kind`` (bpe, unigram, char) trained on ``docs``."""
    from llmosd.models.tokenizer import train_sentencepiece
    return train_sentencepiece("\n".join(docs), vocab_size or 0, seed, kind)


def pack(tok, docs: list[str], add_bos: bool):
    """One token stream: each document encoded as the tokenizer encodes prompts (``add_bos``:
    with its BOS) and followed by the end-of-text token; uint16 when the vocabulary fits."""
    import numpy as np
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    eos = [tok.eos_id] if tok.eos_id is not None else []
    # one document's ids at a time as Python ints (28 bytes each), the stream as a compact array
    parts = [np.asarray(tok.encode(d, add_bos=add_bos) + eos, dtype=dtype) for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def split_at(n: int) -> int:
    """How many of a stream of ``n`` tokens train; the rest (the last tenth) validate."""
    return n * 9 // 10


def split(tokens):
    """(train, validation): the validation tokens are the last tenth of the stream."""
    n = split_at(len(tokens))
    return tokens[:n], tokens[n:]


def _rng(seed: int, step: int, micro: int, stream: int):
    import numpy as np
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, step, micro])))


def offsets(n: int, block: int, count: int, seed: int, step: int, micro: int, stream: int = TRAIN):
    """``count`` random start offsets of (block + 1)-token windows in a stream of ``n`` tokens."""
    if n < block + 1:
        raise ValueError(f"{n:,} tokens cannot hold a block of {block:,} and its targets")
    return _rng(seed, step, micro, stream).integers(0, n - block, size=count)


def windows(tokens, starts, block: int):
    """(inputs, targets) int64 arrays (len(starts), block): targets are inputs shifted by one."""
    import numpy as np
    idx = np.asarray(starts)[:, None] + np.arange(block + 1)[None, :]
    w = tokens[idx].astype(np.int64)
    return w[:, :-1], w[:, 1:]


def train_batch(tokens, block: int, batch: int, seed: int, step: int, micro: int,
                rank: int = 0, world: int = 1):
    """Rank ``rank``'s ``batch`` rows of the global batch (``batch * world`` rows) of optimizer
    step ``step``, micro-step ``micro``."""
    starts = offsets(len(tokens), block, batch * world, seed, step, micro)
    return windows(tokens, starts[rank * batch:(rank + 1) * batch], block)


def val_batch(tokens, block: int, batch: int, seed: int, k: int):
    """Validation batch ``k``: the same rows at every evaluation, so losses compare."""
    return windows(tokens, offsets(len(tokens), block, batch, seed, k, 0, VAL), block)


def dropout_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The torch seed of a micro-step's dropout masks: a pure function, as batches are."""
    import numpy as np
    return int(np.random.SeedSequence([seed, DROPOUT, step, micro, rank]).generate_state(1, np.uint64)[0])
