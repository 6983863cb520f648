"""Issue 13 (part C): the paged forward pass, the batched Runner.run and calls cut into slices,
against the contiguous KVCache path and whole-call results, on tiny random models (CPU)."""
import random

import pytest
import torch

import llmosd.serve.evaluate as evaluate
from llmctl.errors import Cancelled, Internal, InvalidArgument, OutOfMemory
from llmosd.models import lora
from llmosd.models.llama import KVCache, Llama, LlamaConfig, PagedKV, paged_batch
from llmosd.serve import runner as runner_mod
from llmosd.serve.request import Call, SamplingParams
from llmosd.serve.runner import Runner, SeqWork

GREEDY = SamplingParams(temperature=0.0)


class Tok:
    """Byte-ish ids, BOS 0, no EOS."""
    bos_id, eos_id, chat_template = 0, None, None

    def encode(self, text, add_bos=True):
        return ([0] if add_bos else []) + [1 + b % 90 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)

    def eos_ids(self):
        return set()


def tiny(kv=2, std=0.3, context=160, **kw) -> Llama:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=context,
                      eos_token_id=None, **kw)
    m = Llama(cfg)
    m.init_weights(seed=3, std=std)        # spread logits: greedy choices are not near-ties
    return m.eval()


def shuffled_table(n_blocks: int, pool: int, seed: int) -> list[int]:
    ids = list(range(pool))
    random.Random(seed).shuffle(ids)
    return ids[:n_blocks]


def ids_of(n, seed):
    return torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kw", [{}, {"kv": 4}, {"kv": 1, "tie_word_embeddings": True}])
def test_i13_2_paged_chunks_at_odd_boundaries_equal_contiguous(kw):
    """Prefill chunks of one sequence at any start over a shuffled block table, then decodes:
    the logits of every position equal the contiguous KVCache path's (GQA, MHA, MQA)."""
    m, bs = tiny(**kw), 5
    x = ids_of(50, 1)
    table = shuffled_table(10, 24, seed=2)
    cuts = [(0, 7), (7, 8), (8, 19), (19, 23), (23, 41)] + [(i, i + 1) for i in range(41, 50)]
    with torch.no_grad():
        cache = KVCache(m.config, 64)
        ref = torch.cat([m(torch.tensor([x[a:b]]), cache, a)[0] for a, b in cuts])
        kv = PagedKV(m.config, 24, bs)
        got = torch.cat([m.forward_paged(paged_batch([(x[a:b], a, table)], bs, "cpu")[0], kv)
                         for a, b in cuts])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_i13_2_several_sequences_in_one_forward_equal_each_alone():
    """Decodes of sequences of different lengths and prefill chunks (one at a cached start)
    in ONE forward: each sequence's logits equal its own contiguous forward."""
    m, bs = tiny(), 4
    prompts = [ids_of(n, 10 + n) for n in (3, 9, 17, 30, 12)]
    tables = [list(range(40))[i::5][:8] for i in range(5)]       # interleaved, non-contiguous blocks
    kv = PagedKV(m.config, 40, bs)
    with torch.no_grad():
        # sequences 0-2 are already prefilled; 3 gets a chunk at 0; 4 its first 5 tokens now
        for i in (0, 1, 2):
            m.forward_paged(paged_batch([(prompts[i][:-1], 0, tables[i])], bs, "cpu")[0], kv)
        m.forward_paged(paged_batch([(prompts[4][:5], 0, tables[4])], bs, "cpu")[0], kv)
        seqs = [(prompts[i][-1:], len(prompts[i]) - 1, tables[i]) for i in (0, 1, 2)]
        seqs += [(prompts[3][:11], 0, tables[3]), (prompts[4][5:], 5, tables[4])]
        pb, last = paged_batch(seqs, bs, "cpu")
        got = m.forward_paged(pb, kv, torch.tensor(last))                     # (5, V)
        want = torch.stack([m(torch.tensor([p]))[0, -1] for p in prompts[:3]]
                           + [m(torch.tensor([prompts[3][:11]]))[0, -1], m(torch.tensor([prompts[4]]))[0, -1]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def make_runner(model=None, num_blocks=64, block_size=4):
    return Runner(model or tiny(), Tok(), torch.device("cpu"), num_blocks=num_blocks, block_size=block_size)


class Seqs:
    """Greedy generation of several sequences through Runner.run, with tables from a
    shuffled free list (a stand-in for the block manager)."""

    def __init__(self, run: Runner, seed=0):
        self.run, self.free = run, shuffled_table(run.num_blocks, run.num_blocks, seed)
        self.tables, self.tokens, self.done = {}, {}, {}

    def table(self, key, n_positions):
        t = self.tables.setdefault(key, [])
        while len(t) * self.run.block_size < n_positions:
            t.append(self.free.pop())
        return t

    def work(self, key, prompt, chunk, sampling=GREEDY, gen=None, adapter=None):
        toks, done = self.tokens.setdefault(key, list(prompt)), self.done.setdefault(key, 0)
        ids = toks[done:done + chunk]
        self.done[key] = done + len(ids)
        return SeqWork(key, ids, done, self.table(key, done + len(ids)), sample=self.done[key] == len(toks),
                       sampling=sampling, generator=gen, history=list(toks), adapter=adapter)

    def feed(self, works, outs):
        for w, o in zip(works, outs):
            if o is not None:
                self.tokens[w.key].append(o.token)


def generate(run, prompts, n_new, chunk=5, together=True, **kw):
    """Greedy tokens of each prompt: all stepped together (one run per step) or each alone."""
    groups = [list(prompts)] if together else [[p] for p in prompts]
    out = {}
    for g in groups:
        s = Seqs(run)
        keys = {id(p): k for k, p in enumerate(g)}
        while any(len(s.tokens.get(keys[id(p)], p)) < len(p) + n_new for p in g):
            works = [s.work(keys[id(p)], p, chunk, **kw) for p in g
                     if len(s.tokens.get(keys[id(p)], p)) < len(p) + n_new]
            s.feed(works, run.run(works))
        for p in g:
            out[tuple(p)] = s.tokens[keys[id(p)]][len(p):]
    return [out[tuple(p)] for p in prompts]


def test_i13_2_batched_greedy_equals_solo_float32():
    """Sequences of different lengths stepped together (chunked prefills beside decodes, one
    forward per step) choose the same greedy tokens as each alone, and the same as the
    contiguous per-sequence path."""
    run = make_runner()
    prompts = [ids_of(n, n) for n in (2, 7, 13, 21, 4, 9)]
    with run.session():
        batched = generate(run, prompts, 12)
        solo = generate(run, prompts, 12, together=False)
        ref = []
        for p in prompts:                   # the pre-issue-13 path: one KVCache per sequence
            cache, toks = run.new_cache(64), list(p)
            out = run.step(cache, toks, 0, GREEDY, None, toks)
            for _ in range(11):
                toks.append(out.token)
                out = run.step(cache, [out.token], len(toks) - 1, GREEDY, None, toks)
            ref.append(toks[len(p):] + [out.token])
    assert batched == solo == ref


def test_i13_2_seeded_sampling_batched_equals_solo():
    """Per-sequence generators: seeded sampling gives the same tokens batched as alone."""
    run = make_runner()
    prompts = [ids_of(n, 40 + n) for n in (3, 11, 6)]
    sp = SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.3, seed=5)

    def go(together):
        out = []
        groups = [prompts] if together else [[p] for p in prompts]
        for g in groups:
            s = Seqs(run)
            gens = [torch.Generator().manual_seed(7 + prompts.index(p)) for p in g]
            for _ in range(8 + 3):
                works = [s.work(prompts.index(p), p, 4, sampling=sp, gen=gn) for p, gn in zip(g, gens)]
                s.feed(works, run.run(works))
            out += [s.tokens[prompts.index(p)] for p in g]
        return out
    with run.session():
        assert go(True) == go(False)


def test_i13_2_adapters_grouped_per_run():
    """Rows with different adapters in one run: each group runs with its adapter active, so
    the tokens equal each sequence's alone; a row whose adapter is gone gets Cancelled."""
    m = tiny()
    run = make_runner(m)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.TARGETS)
    lora.add_adapter(m, "tmp", cfg, seed=1)
    tensors = {k: torch.randn_like(v) * 0.3 for k, v in lora.adapter_tensors(m, "tmp").items()}
    lora.remove_adapter(m, "tmp")
    run.install("ad", lora.Adapter("ad", cfg, tensors, None, None))
    prompts = [ids_of(n, 70 + n) for n in (5, 8, 3, 12)]
    adapters = ["ad", None, "ad", None]
    with run.session():
        s = Seqs(run)
        for _ in range(8):
            works = [s.work(k, p, 6, adapter=a) for k, (p, a) in enumerate(zip(prompts, adapters))]
            s.feed(works, run.run(works))
        together = [s.tokens[k] for k in range(4)]
        for k, (p, a) in enumerate(zip(prompts, adapters)):
            s1 = Seqs(run)
            for _ in range(8):
                w = [s1.work(0, p, 6, adapter=a)]
                s1.feed(w, run.run(w))
            assert s1.tokens[0] == together[k]
        base = generate(run, [prompts[0]], 4, chunk=6)[0]
        assert together[0][5:9] != base                 # the adapter changes the output
        outs = run.run([SeqWork("x", [1, 2], 0, [0], adapter="gone"), SeqWork("y", [1, 2], 0, [1])])
    assert isinstance(outs[0], Cancelled) and outs[1].token >= 0


def test_i13_2_runner_pool_api_and_errors(monkeypatch):
    run = make_runner(num_blocks=10, block_size=8)
    c = run.model.config
    assert run.kv_position_bytes == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    assert run.block_bytes == 8 * run.kv_position_bytes
    assert run.pool_bytes == 11 * run.block_bytes == run.kv.nbytes()       # + the scratch block
    with run.session():
        with pytest.raises(Internal, match="bad step"):                     # table too short
            run.run([SeqWork("a", [1] * 9, 0, [0])])
        assert run.run([SeqWork("a", [1] * 9, 0, [0, 1], sample=False)]) == [None]

    def oom(*a, **k):
        raise torch.OutOfMemoryError("no")
    monkeypatch.setattr(runner_mod, "PagedKV", oom)
    with pytest.raises(OutOfMemory, match="KV cache pool"):
        make_runner(num_blocks=10)


def test_i13_2_logprobs_in_batch():
    run = make_runner()
    with run.session():
        a, b = run.run([SeqWork("a", [1, 2, 3], 0, [0], logprobs=3, sampling=GREEDY),
                        SeqWork("b", [4], 0, [1], sampling=SamplingParams(temperature=0.0))])
        ref = run.step(run.new_cache(8), [1, 2, 3], 0, GREEDY, None, [1, 2, 3], logprobs=3)
    assert a.token == ref.token and a.logprob == pytest.approx(ref.logprob, abs=1e-5)
    assert [i for i, _ in a.top] == [i for i, _ in ref.top] and b.top == []


# -- calls cut into slices -------------------------------------------------------------------

def record_passes(m, monkeypatch):
    sizes = []
    real = m.hidden

    def hidden(tokens, cache=None, start=0):
        sizes.append(tokens.numel())
        return real(tokens, cache, start)
    monkeypatch.setattr(m, "hidden", hidden)
    return sizes


def drive(task):
    used = []
    while not task.done:
        used.append(task.step())
    return used, task.result


def test_i13_2_sliced_calls_equal_whole_calls(monkeypatch):
    """score (several windows), embed, classify and classify_head run a slice of at most N
    tokens per step and give the results of the whole call."""
    m = tiny(context=128)
    run = make_runner(m)
    text = "".join(chr(97 + i % 26) for i in range(300))           # 301 tokens: 4 windows of 128
    head = torch.randn(3, 64)
    run.adapters[None] = runner_mod.Installed(False, head, ["x", "y", "z"])
    calls = [Call(1, "score", {"text": text}),
             Call(2, "embed", {"inputs": ["short", "b" * 40, "c" * 120], "pooling": "mean"}),
             Call(3, "embed", {"inputs": ["d" * 50], "pooling": "last", "normalize": False}),
             Call(4, "classify", {"inputs": ["some text here " * 2, "x"],
                                  "labels": ["alpha", "be", "gamma ray"]}),
             Call(5, "classify_head", {"inputs": ["e" * 45, "f"]})]
    with run.session():
        for call in calls:
            whole = run.call(call, lambda: False)
            sizes = record_passes(m, monkeypatch)
            used, got = drive(run.start_call(call, slice_tokens=16))
            monkeypatch.undo()
            assert max(sizes) <= 16 and sum(used) >= sum(sizes) - 16 and len(used) > 2, call.name
            if call.name == "embed":
                assert got["tokens"] == whole["tokens"]
                torch.testing.assert_close(torch.frombuffer(bytearray(got["data"]), dtype=torch.float32),
                                           torch.frombuffer(bytearray(whole["data"]), dtype=torch.float32),
                                           atol=1e-5, rtol=0)
            elif call.name == "score":
                assert got["windows"] == whole["windows"] == 4
                assert [t["id"] for t in got["tokens"]] == [t["id"] for t in whole["tokens"]]
                assert [t["logprob"] for t in got["tokens"][1:]] == pytest.approx(
                    [t["logprob"] for t in whole["tokens"][1:]], abs=1e-4)
                assert got["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
            else:
                for r, w in zip(got["results"], whole["results"]):
                    assert r["label"] == w["label"]
                    assert r["scores"] == pytest.approx(w["scores"], abs=1e-4)


def test_i13_2_call_task_errors_and_whole_score_unchanged():
    """Bad input fails the task's first step with InvalidArgument; a call without slicing is
    one pass per window, as before."""
    m = tiny(context=64)
    run = make_runner(m)
    with run.session():
        task = run.start_call(Call(1, "score", {"text": ""}), 16)
        with pytest.raises(InvalidArgument, match="two tokens"):
            task.step()
        assert task.done and isinstance(task.error, InvalidArgument)
        with pytest.raises(InvalidArgument, match="no classification head"):
            run.start_call(Call(2, "classify_head", {"inputs": ["a"]}))
        text = "hello world, a short text"
        r = evaluate.score(m, Tok(), "cpu", text=text)
        ids = Tok().encode(text)
        lp = m(torch.tensor([ids]))[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert r["logprob"] == pytest.approx(lp.sum().item(), rel=1e-6) and r["windows"] == 1
