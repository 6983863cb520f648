"""Admission of generations against the KV-cache byte limit (issue 7.5): the arithmetic as
pure unit tests, the engine's cache never larger than the reservation, and a daemon with a
small limit answering ``busy`` past it and taking requests again once they end; and
engines that stop promptly in the middle of a long call (issue 7.10)."""
from __future__ import annotations

import queue
import time

import pytest
import torch

from conftest import SHAKESPEARE, TINY, Daemon
from llmctl import errors
from llmosd.serve.engine import Engine
from llmosd.models.llama import KVCache, Llama, LlamaConfig
from llmosd.serve.request import Request, SamplingParams
from llmosd.serve.scheduler import (CHAT_TEMPLATE_MARGIN, PROMPT_MARGIN, KVBudget, kv_position_bytes,
                              kv_positions, prompt_token_bound)

MiB = 1 << 20


def test_kv_arithmetic_matches_the_cache_and_the_issue():
    # SmolLM2-135M in float32: 30 layers, 3 KV heads of 64: 360 MiB for its 8,192 positions
    per = kv_position_bytes(30, 3, 64, 4)
    assert per == 46_080 and per * 8192 == 360 * MiB
    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(cfg, 17, dtype=dtype)
        assert cache.nbytes() == 17 * kv_position_bytes(3, 2, 16, dtype.itemsize)
    # prompt bound: one token per UTF-8 byte plus a margin; chat adds template overheads
    assert prompt_token_bound("héllo") == 6 + PROMPT_MARGIN
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert prompt_token_bound("", msgs) > 4 + 13 + CHAT_TEMPLATE_MARGIN
    assert kv_positions(8192, 22, 100) == 122
    assert kv_positions(8192, 22, 1_000_000) == 8192          # capped by the context


def test_i12_2_kv_cache_messages_use_the_cli_s_decimal_units():
    """Sizes in KV-cache refusals read as llmctl's tables (decimal MB, not MiB); two numbers
    that would round alike are written in plain bytes."""
    b = KVBudget(10 * MiB)
    with pytest.raises(errors.Busy) as e:
        b.admit("a", 1, 2 * MiB, budget_free=("cpu", MiB))
    assert "needs 2.1 MB" in str(e.value) and "cpu has 1.0 MB free" in str(e.value)
    assert "MiB" not in str(e.value)
    b = KVBudget(1_000_050)
    b.admit("a", 1, 40)
    with pytest.raises(errors.Busy) as e:
        b.admit("b", 1, 1_000_020)
    assert "needs 1000020 B, 1000010 B of the 1000050 B limit is free" in str(e.value)


def test_kv_budget_busy_too_big_shrink_release():
    b = KVBudget(10 * MiB)
    b.admit("a", 1, 4 * MiB)
    b.admit("b", 2, 4 * MiB)
    with pytest.raises(errors.Busy) as e:
        b.admit("c", 1, 4 * MiB)
    msg = str(e.value) + e.value.hint
    assert "4.2 MB" in msg and "2.1 MB" in msg and "10.5 MB" in msg and "max_tokens" in msg
    with pytest.raises(errors.InvalidArgument) as e:
        b.admit("huge", 1, 11 * MiB, position_bytes=MiB, prompt_bound=3)
    assert "max_tokens up to 7" in str(e.value) and "max_kv_bytes" in e.value.hint
    b.shrink("a", 1 * MiB)                       # the engine allocated less than the bound
    b.shrink("a", 3 * MiB)                       # never grows back
    assert b.used == 5 * MiB
    b.admit("c", 1, 4 * MiB)
    b.release("b")
    b.release("b")                               # twice is harmless
    b.release_owner(1)                           # its instance stopped
    assert b.used == 0 and b.free == 10 * MiB


class ByteTok:
    """Bytes as tokens (ids 0..255), BOS 256, EOS 257: enough tokenizer for the engine."""
    bos_id, eos_id, chat_template = 256, 257, None

    def encode(self, text, add_bos=True):
        return ([256] if add_bos else []) + list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def token(self, i):
        return None if i is None else self.decode([i])

    def eos_ids(self):
        return {257}


def tiny_engine(context=64):
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      eos_token_id=None)
    m = Llama(cfg)
    m.init_weights(seed=0)
    events = queue.Queue()
    eng = Engine(1, m.eval(), ByteTok(), torch.device("cpu"), lambda k, kind, body: events.put((k, kind, body)))
    return eng, events


def test_engine_cache_never_exceeds_the_reservation():
    eng, events = tiny_engine()
    eng.start()
    try:
        eng.submit(Request("r", "abc", 50, SamplingParams(temperature=0)), kv_positions=10)
        got = []
        while not got or got[-1][1] not in ("end", "error"):
            got.append(events.get(timeout=30))
    finally:
        eng.stop()
        eng.join(10)
    kv = [b for _, kind, b in got if kind == "kv"]
    assert kv == [{"bytes": 10 * eng.kv_position_bytes, "positions": 10}]
    end = got[-1][2]
    assert got[-1][1] == "end" and end["finish_reason"] == "context"
    assert end["prompt_tokens"] + end["generated_tokens"] <= 10


def test_i7_5_kv_admission_busy_past_limit(tmp_path):
    """A daemon with a KV limit that holds two of these requests: of six at once two run, the
    rest get Busy naming the bytes and the fix, the daemon stays up, and once they end the
    capacity is back."""
    per = kv_position_bytes(2, 2, 16, 4)                 # TINY in float32
    prompt, max_tokens = "ROMEO:", 200
    need = kv_positions(2048, prompt_token_bound(prompt), max_tokens) * per
    d = Daemon(tmp_path / "d", env={"LLMOSD_MAX_KV_BYTES": str(need * 5 // 2)}).start()
    clients = []
    try:
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        clients = [d.client() for _ in range(6)]
        # all six arrive while the model loads, so all are admitted in one control-loop turn
        gens = [c.generate("tiny", prompt, max_tokens=max_tokens, temperature=0) for c in clients]
        ok, busy = 0, []
        for g in gens:
            try:
                g.text()
                ok += 1
            except errors.Busy as e:
                busy.append(e)
        assert ok == 2 and len(busy) == 4, (ok, busy)
        msg = str(busy[0]) + busy[0].hint
        assert "KV-cache" in msg and "limit" in msg and "max_tokens" in msg, msg
        assert d.proc.poll() is None
        # capacity came back: two at once run again
        gens = [c.generate("tiny", prompt, max_tokens=max_tokens, temperature=0) for c in clients[:2]]
        for g in gens:
            g.text()
            assert g.stats["generated_tokens"] >= 1 and g.stats["finish_reason"] in ("length", "stop")
        # one request bigger than the whole limit is refused as such, not as busy
        with pytest.raises(errors.InvalidArgument, match="whole limit"):
            clients[0].generate("tiny", "x" * (need * 3 // per), max_tokens=max_tokens).text()
    finally:
        for c in clients:
            c.close()
        d.stop()


def test_i7_10_engine_stops_promptly_during_a_long_call():
    """stop() during a score of thousands of windows ends the engine after the window it is in
    (the call fails with Cancelled), instead of when the whole call is done."""
    from llmosd.serve.request import Call
    eng, events = tiny_engine(context=16)
    eng.start()
    try:
        eng.submit(Call("s", "score", {"text": "x" * 60_000}))          # ~7,500 windows
        time.sleep(0.3)
        t0 = time.monotonic()
        eng.stop()
        eng.join(10)
        assert not eng.is_alive() and time.monotonic() - t0 < 2
    finally:
        eng.stop()
        eng.join(10)
    got = []
    while not events.empty():
        got.append(events.get())
    assert ("s", "error") in [(k, kind) for k, kind, _ in got]
    err = next(b for k, kind, b in got if k == "s")
    assert err["name"] == "cancelled", err
    assert got[-1][1] == "stopped"
