"""Admission of generations (issue 7.5, as issue 13 made it): no per-request KV reservation;
each instance has a paged KV pool and a bounded wait queue, so no client can exhaust the
daemon: a sequence never outgrows the pool, past ``max_waiting`` queued requests a new one
gets ``busy`` (and the daemon takes requests again once they end), a prompt the pool could
never hold is invalid_argument naming the fix; and engines stop promptly in the middle of a
long call (issue 7.10)."""
from __future__ import annotations

import queue
import time

import pytest
import torch

from conftest import SHAKESPEARE, TINY, Daemon
from llmctl import errors
from llmosd.serve.engine import Engine
from llmosd.models.llama import Llama, LlamaConfig
from llmosd.serve.request import Request, SamplingParams


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


def tiny_engine(context=64, **kw):
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      eos_token_id=None)
    m = Llama(cfg)
    m.init_weights(seed=0)
    events = queue.Queue()
    eng = Engine(1, m.eval(), ByteTok(), torch.device("cpu"), lambda k, kind, body: events.put((k, kind, body)),
                 **kw)
    return eng, events


def test_i13_2_a_sequence_never_outgrows_the_instances_pool():
    """The pool holds 16 positions: a request that may generate 50 tokens ends with finish
    reason "context" at the pool's end instead of taking memory nobody admitted."""
    eng, events = tiny_engine(num_blocks=2, block_size=8)
    eng.start()
    try:
        eng.submit(Request("r", "abc", 50, SamplingParams(temperature=0)))
        got = []
        while not got or got[-1][1] not in ("end", "error"):
            got.append(events.get(timeout=30))
    finally:
        eng.stop()
        eng.join(10)
    end = got[-1][2]
    assert got[-1][1] == "end" and end["finish_reason"] == "context"
    assert end["prompt_tokens"] + end["generated_tokens"] <= 16


def test_i7_5_busy_past_max_waiting_and_back_once_they_end(tmp_path):
    """A daemon that runs one sequence at a time with two waiting: of six requests arriving
    together (while the model loads) at most three are taken, the rest get Busy naming
    max_waiting, the daemon stays up, and once they end it takes requests again; a prompt
    bigger than the whole KV pool is refused as such (invalid_argument naming the fix)."""
    per = 2 * 2 * 2 * 16 * 4                             # TINY in float32: bytes a position
    d = Daemon(tmp_path / "d", env={"LLMOSD_MAX_BATCH": "1", "LLMOSD_MAX_WAITING": "2",
                                    "LLMOSD_MAX_KV_BYTES": str(300 * per)}).start()
    clients = []
    try:
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        clients = [d.client() for _ in range(6)]
        # all six arrive while the model loads, so all reach the engine in one turn
        gens = [c.generate("tiny", "ROMEO:", max_tokens=40, temperature=0) for c in clients]
        ok, busy = 0, []
        for g in gens:
            try:
                g.text()
                ok += 1
            except errors.Busy as e:
                busy.append(e)
        assert ok + len(busy) == 6 and 1 <= ok <= 3 and busy, (ok, busy)
        msg = str(busy[0]) + busy[0].hint
        assert "waiting" in msg and "max_waiting" in msg, msg
        assert d.proc.poll() is None
        gens = [c.generate("tiny", "ROMEO:", max_tokens=40, temperature=0) for c in clients[:2]]
        for g in gens:
            g.text()
            assert g.stats["generated_tokens"] >= 1 and g.stats["finish_reason"] in ("length", "stop")
        with pytest.raises(errors.InvalidArgument, match="positions") as e:
            clients[0].generate("tiny", "ROMEO " * 400, max_tokens=4).text()
        assert "max_kv_bytes" in e.value.hint
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
