"""Issue 10: training data (``train/data.py``): documents from text and JSONL, SentencePiece
tokenizers (char comparable with classic baselines), packing, the split, batches as a pure
function of (seed, step, micro-step) with rank r taking the r-th share of the global batch."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHAKESPEARE
from llmosd.models.loader import build_tokenizer
from llmosd.train import data as D


def test_i10_documents_text_and_jsonl():
    files = {"b.jsonl": b'{"text": "one"}\n\n{"text": "two", "id": 3}\n{"text": ""}\n',
             "a.txt": "\ufeffplain text\n".encode()}
    assert D.documents(files) == ["plain text\n", "one", "two"]         # name order, BOM gone
    with pytest.raises(ValueError, match=r"^b.jsonl line 2: each line must be a JSON object"):
        D.documents({"b.jsonl": b'{"text": "ok"}\n["text"]\n'})
    with pytest.raises(ValueError, match=r"^x.jsonl line 1: not valid JSON"):
        D.documents({"x.jsonl": b'{"text": "unterminated\n'})


def test_i10_char_tokenizer_is_one_piece_per_character():
    text = SHAKESPEARE.read_text()
    blob = D.train_tokenizer([text], "char", None, 0)
    tok = build_tokenizer("sentencepiece", blob, {"tokenizer": {"add_bos": False}})
    assert tok.vocab_size == len(set(text)) + 3 == 68          # 65 characters + unk, bos, eos
    sample = text[:5000]
    ids = tok.encode(sample)
    assert len(ids) == len(sample) and tok.decode(ids) == sample
    assert D.train_tokenizer([text], "char", None, 0) == blob   # deterministic


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_i10_subword_tokenizers(kind):
    text = SHAKESPEARE.read_text()[:100_000]
    tok = build_tokenizer("sentencepiece", D.train_tokenizer([text], kind, 400, 1), None)
    ids = tok.encode(text[:2000], add_bos=False)
    assert tok.vocab_size <= 400 and len(ids) < 2000 and tok.decode(ids) == text[:2000]


def test_i10_pack_ends_each_document_and_split_keeps_the_last_tenth():
    tok = build_tokenizer("sentencepiece", D.train_tokenizer(["abc\ndef"], "char", None, 0),
                          {"tokenizer": {"add_bos": False}})
    stream = D.pack(tok, ["ab", "cde"], add_bos=True)
    assert stream.dtype == np.uint16 and len(stream) == 7
    assert stream[2] == stream[6] == tok.eos_id and tok.decode(list(stream[:2])) == "ab"
    train, val = D.split(np.arange(1000))
    assert len(train) == 900 and list(val[:2]) == [900, 901] and len(val) == 100


def test_i10_batches_are_pure_and_ranks_share_the_global_batch():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = D.train_batch(tokens, 16, 8, seed=3, step=5, micro=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == np.int64
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    again, _ = D.train_batch(tokens, 16, 8, seed=3, step=5, micro=1)
    assert (again == x).all()                                        # a function of its inputs
    assert not (D.train_batch(tokens, 16, 8, seed=3, step=6, micro=1)[0] == x).all()
    assert not (D.train_batch(tokens, 16, 8, seed=3, step=5, micro=0)[0] == x).all()
    assert not (D.train_batch(tokens, 16, 8, seed=4, step=5, micro=1)[0] == x).all()
    halves = [D.train_batch(tokens, 16, 4, 3, 5, 1, rank=r, world=2)[0] for r in range(2)]
    assert (np.concatenate(halves) == x).all()                       # rank r: the r-th share
    v1, v2 = D.val_batch(tokens, 16, 8, 3, 0)[0], D.val_batch(tokens, 16, 8, 3, 0)[0]
    assert (v1 == v2).all() and not (v1 == D.val_batch(tokens, 16, 8, 3, 1)[0]).all()
    edge = np.arange(17)                                             # exactly one block
    assert (D.train_batch(edge, 16, 2, 0, 0, 0)[0] == edge[:16]).all()
    with pytest.raises(ValueError, match="cannot hold a block"):
        D.train_batch(edge[:16], 16, 2, 0, 0, 0)


def test_i10_dropout_seeds_differ_by_step_micro_and_rank():
    seeds = {D.dropout_seed(0, s, m, r) for s in range(3) for m in range(2) for r in range(2)}
    assert len(seeds) == 12 and D.dropout_seed(0, 1, 1, 1) == D.dropout_seed(0, 1, 1, 1)
    assert all(0 <= s < 1 << 64 for s in seeds)


def test_i10_jsonl_text_round_trip():
    docs = ["first line\nsecond", "émoji 🙂"]
    blob = "\n".join(json.dumps({"text": d}) for d in docs).encode()
    assert D.documents({"d.jsonl": blob}) == docs
