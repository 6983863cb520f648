"""Issue 9, serving side: immutable requests built without torch (1), stream credits instead of
a shared counter (2), the runner as the torch half of the engine (3), one owner of the task
registry (4), device work off the control loop (5), resident bytes from the instance's own
tensors (6), device/dtype choice in mem/devices (7), and the dead code made real (8).

Engines here run a real tiny model in-process with a fake ``emit``; nothing starts a daemon."""
from __future__ import annotations

import dataclasses
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import FakeStream
from llmctl import errors
from llmosd.models.llama import KVCache, Llama, LlamaConfig
from llmosd.serve import engine as engine_mod
from llmosd.serve.engine import Engine
from llmosd.serve.request import Call, Request, SamplingParams, Task

ROOT = Path(__file__).resolve().parents[2]


class LetterTok:
    """Every id decodes to one letter, so every token is one chunk; no EOS, BOS 0."""
    bos_id, eos_id, chat_template = 0, None, None

    def encode(self, text, add_bos=True):
        return ([0] if add_bos else []) + [1 + b % 60 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)

    def token(self, i):
        return None if i is None else self.decode([i])

    def eos_ids(self):
        return set()


def tiny_model(context=256) -> Llama:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      eos_token_id=None)
    m = Llama(cfg)
    m.init_weights(seed=0)
    return m.eval()


def start_engine(stream_buffer=3):
    events = queue.Queue()
    eng = Engine(1, tiny_model(), LetterTok(), torch.device("cpu"),
                 lambda k, kind, body: events.put((k, kind, body)), max_batch=4, stream_buffer=stream_buffer)
    eng.start()
    return eng, events


def next_of(events, kind, timeout=10.0):
    """The next event of ``kind`` (others skipped), or None if none comes within ``timeout``."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        try:
            k, got, body = events.get(timeout=left)
        except queue.Empty:
            return None
        if got == kind:
            return body
    return None


# -- 1: immutable, torch-free values ---------------------------------------------------------

def test_i9_1_request_is_an_immutable_value_and_ops_import_no_torch():
    req = Request("k", "hi", 5, SamplingParams(temperature=0), ["\n"],
                  messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.prompt = "other"
    assert req.stops == ("\n",) and isinstance(req.messages, tuple)
    assert {f.name for f in dataclasses.fields(Request)} == \
        {"key", "prompt", "messages", "max_tokens", "sampling", "stops", "add_bos", "logprobs", "adapter",
         "submitted"}
    # ops/serve.py (loaded from its file, apart from the package's other handlers), request.py
    # and the table import no torch, directly or through anything they import
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ops_serve', {str(ROOT / 'llmosd/ops/serve.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import llmosd.serve.request, llmosd.serve.chat, llmosd.serve.scheduler, llmosd.table\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# -- 2: credits ------------------------------------------------------------------------------

def test_i9_2_slow_reader_blocks_at_stream_buffer_and_a_credit_resumes_it_at_once(monkeypatch):
    """A reader that takes nothing: the engine emits exactly ``stream_buffer`` chunks, then
    sleeps on its condition (no polling naps); each credit lets exactly one more chunk out,
    woken by the credit itself (the idle wait is made 60 s, so only a wake-up can be quick)."""
    monkeypatch.setattr(engine_mod, "IDLE_WAIT", 60.0)
    eng, events = start_engine(stream_buffer=3)
    waits = []
    real_wait = eng._cv.wait
    eng._cv.wait = lambda timeout=None: (waits.append(timeout), real_wait(timeout))[1]
    try:
        eng.submit(Request("r", "Hello", 40, SamplingParams(temperature=0)))
        for _ in range(3):
            assert next_of(events, "chunk") is not None
        assert next_of(events, "chunk", timeout=0.5) is None, "a 4th chunk passed the stream buffer"
        assert len(waits) <= 2, f"the engine polled while blocked: {len(waits)} waits"
        for _ in range(3):                       # one credit, one chunk, blocked again
            t0 = time.monotonic()
            eng.credit("r")
            assert next_of(events, "chunk", timeout=30) is not None
            assert time.monotonic() - t0 < 10, "the credit did not wake the engine"
            assert next_of(events, "chunk", timeout=0.2) is None
        eng.credit("r", 100)                     # the reader caught up: it runs to the end
        end = next_of(events, "end", timeout=30)
        assert end is not None and end["generated_tokens"] == 40 and end["finish_reason"] == "length"
        eng.credit("r")                          # credits of a finished request are ignored
        eng.credit("unknown")
    finally:
        eng.stop()
        eng.join(10)
    assert not eng.is_alive()


def test_i9_2_engine_with_nothing_to_do_sleeps_until_a_message_arrives(monkeypatch):
    monkeypatch.setattr(engine_mod, "IDLE_WAIT", 60.0)
    eng, events = start_engine()
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        eng.submit(Request("a", "Hi", 2, SamplingParams(temperature=0)))
        assert next_of(events, "end", timeout=30) is not None
        assert time.monotonic() - t0 < 10
    finally:
        eng.stop()
        eng.join(10)


# -- 3: the runner ---------------------------------------------------------------------------

def test_i9_3_runner_step_equals_a_plain_forward_pass():
    from llmosd.serve.runner import Runner
    m = tiny_model()
    run = Runner(m, LetterTok(), torch.device("cpu"))
    prompt = [0, 5, 9, 13, 2]
    with run.session():
        cache = run.new_cache(16)
        sp = SamplingParams(temperature=0)
        first = run.step(cache, prompt, 0, sp, run.new_generator(1), prompt, logprobs=2)
        second = run.step(cache, [first.token], len(prompt), sp, run.new_generator(1), prompt)
        full = m(torch.tensor([prompt + [first.token]]))[0].log_softmax(-1)     # (T+1, V)
    assert first.token == int(full[-2].argmax()) and second.token == int(full[-1].argmax())
    assert first.logprob == pytest.approx(float(full[-2, first.token]), abs=1e-5)
    assert [i for i, _ in first.top][0] == first.token and len(first.top) == 2
    assert run.kv_position_bytes * 16 == cache.nbytes()


# -- 4 and 8: the task registry's one owner; queued requests counted ----------------------------

def manager_without_store():
    """An InstanceManager whose loads fail (no store) and whose posted callbacks wait in a
    list until the test runs them, as the control loop would."""
    from llmosd.serve.instances import InstanceManager
    posted = []
    m = InstanceManager(lambda fn, *a: posted.append((fn, a)), None, torch.device("cpu"), torch.float32,
                        max_batch=2, stream_buffer=4, max_kv_bytes=1 << 20)
    return m, posted


def run_posted(posted):
    for t in [t for t in threading.enumerate() if t.name.startswith("load-")]:
        t.join(30)
    while posted:
        fn, a = posted.pop(0)
        fn(*a)


def test_i9_4_the_instance_manager_owns_tasks_ops_never_touch_them():
    src = (ROOT / "llmosd/ops/serve.py").read_text()
    assert "manager.tasks" not in src and "_tasks" not in src and ".engine" not in src
    m, posted = manager_without_store()
    assert not hasattr(m, "tasks")
    waiting = FakeStream()
    loading = []
    m.run("tiny:latest", {}, "sha256:x", 1000, Task(Request("k1", "Hi", 4, SamplingParams()), waiting),
          lambda: loading.append(True))
    assert loading == [True] and waiting.err is None
    m.cancel("k1", "cancelled by the client")
    assert isinstance(waiting.err, errors.Cancelled) and "before it started" in str(waiting.err)
    m.cancel("k1", "again")                                # unknown by now: nothing happens
    run_posted(posted)                                     # the load fails; nobody is told twice
    assert isinstance(waiting.err, errors.Cancelled)


def test_i9_8_queued_requests_counts_tasks_waiting_for_a_load():
    m, posted = manager_without_store()
    streams = [FakeStream() for _ in range(3)]
    for i, s in enumerate(streams):
        m.run("tiny:latest", {}, "sha256:x", 1000, Task(Request(f"k{i}", "Hi", 4, SamplingParams()), s))
    row, = m.table.rows()
    assert row["state"] == "loading" and row["queued_requests"] == 3
    m.cancel("k0", "cancelled")
    assert m.table.rows()[0]["queued_requests"] == 2
    run_posted(posted)                                     # the load fails: both waiting get it
    row, = m.table.rows()
    assert row["state"] == "failed" and row["queued_requests"] == 0
    assert all(isinstance(s.err, errors.LoadFailed) for s in streams[1:])
    assert not hasattr(Engine, "wake")


def test_i9_8_sampling_settings_layer_over_the_protocols_keys():
    from llmctl.protocol import SAMPLING_KEYS
    from llmosd.ops.serve import sampling_params
    sp = sampling_params({"top_k": 5, "temperature": None, "seed": 3}, {"temperature": 0.1, "bogus": 1})
    assert (sp.temperature, sp.top_k, sp.top_p, sp.seed) == (0.1, 5, 1.0, 3)
    assert set(SAMPLING_KEYS) <= {f.name for f in dataclasses.fields(SamplingParams)}
    with pytest.raises(errors.InvalidArgument, match="top_p"):
        sampling_params({"top_p": 0.0}, None)


# -- 5: device work on the engine thread ---------------------------------------------------------

def test_i9_5_the_engine_frees_the_model_on_its_own_thread(monkeypatch):
    import llmosd.serve.instances as instances
    import llmosd.serve.runner as runner
    freed_on = []
    monkeypatch.setattr(runner.gc, "collect", lambda *a: freed_on.append(threading.current_thread().name))
    eng, events = start_engine()
    eng.stop()
    eng.join(10)
    assert freed_on == [eng.name] and eng.runner.model is None
    assert next_of(events, "stopped", timeout=5) == {}
    assert not hasattr(instances, "gc")            # nothing left for the control loop to collect


# -- 6: resident bytes ---------------------------------------------------------------------------

def test_i9_6_resident_bytes_counts_the_instances_own_storages():
    from llmosd.models.loader import resident_bytes
    m = tiny_model()
    m.lm_head.weight = m.model.embed_tokens.weight            # tied: one storage
    want = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in
                                                      list(m.parameters()) + list(m.buffers())}.values())
    assert resident_bytes(m) == want
    # a parameter viewing part of a bigger storage keeps all of it resident
    big = torch.zeros(1000)
    holder = torch.nn.Module()
    holder.p = torch.nn.Parameter(big[:10], requires_grad=False)
    holder.q = torch.nn.Parameter(big[500:510], requires_grad=False)
    assert resident_bytes(holder) == 4000
    # another allocation meanwhile (a load or a generation elsewhere) does not count
    other = KVCache(m.config, 64)
    assert resident_bytes(m) == want and other.nbytes() > 0


# -- 7: device and dtype choice ------------------------------------------------------------------

def test_i9_7_device_and_dtype_choice_live_in_mem_devices():
    import llmosd.models.loader as loader
    from llmosd.mem import devices
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert devices.resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert devices.DTYPES is loader.DTYPES
    assert not hasattr(loader, "resolve_device") and not hasattr(loader, "resolve_dtype")
    assert devices.device_memory(torch.device("cpu")) > 0
    if not torch.cuda.is_available():
        with pytest.raises(errors.InvalidArgument, match="no CUDA"):
            devices.resolve_device("cuda")


def test_calls_run_between_steps_and_fail_as_llmosd_errors():
    eng, events = start_engine()
    try:
        eng.submit(Call("s", "score", {"text": "Hello there"}))
        eng.submit(Call("e", "embed", {"inputs": ["x"], "pooling": "max"}))
        got = {}
        while len(got) < 2:
            k, kind, body = events.get(timeout=30)
            if kind != "blocks":
                got[k] = (kind, body)
    finally:
        eng.stop()
        eng.join(10)
    assert got["s"][0] == "end" and got["s"][1]["scored_tokens"] > 1
    assert got["e"][0] == "error" and got["e"][1]["name"] == errors.InvalidArgument.name


# -- issue 11: adapters installed on the engine's thread -------------------------------------------

def random_adapter(model, key, seed):
    """A LoRA adapter with random (nonzero) B, so that it changes the output, as lora.Adapter."""
    from llmosd.models import lora
    cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    scratch = tiny_model()
    lora.add_adapter(scratch, "x", cfg, seed=seed)
    tensors = lora.adapter_tensors(scratch, "x")
    g = torch.Generator().manual_seed(seed)
    for k in tensors:
        if "lora_B" in k:
            tensors[k] = torch.randn(tensors[k].shape, generator=g) * 2.0
    return lora.Adapter(key, cfg, tensors, None, None)


def greedy(eng, events, key, prompt, adapter=None, n=12):
    eng.submit(Request(key, prompt, n, SamplingParams(temperature=0), adapter=adapter))
    ids = []
    while True:
        k, kind, body = events.get(timeout=30)
        assert k == key or kind in ("blocks", "adapter"), (k, kind, body)
        if kind == "chunk":
            ids += body["token_ids"]
        elif kind == "end":
            return ids
        elif kind == "error":
            raise AssertionError(body)


def test_i11_3_engine_installs_adapters_between_steps_and_each_request_runs_with_its_own():
    eng, events = start_engine(stream_buffer=1000)
    a1, a2 = random_adapter(None, "sha256:" + "1" * 64, 1), random_adapter(None, "sha256:" + "2" * 64, 2)
    try:
        base = greedy(eng, events, "b0", "Hello")
        eng.add_adapter(a1.key, a1)
        eng.add_adapter(a2.key, a2)
        got = {}
        while len(got) < 2:
            k, kind, body = events.get(timeout=30)
            assert kind == "adapter"
            got[k] = body
        want = sum(t.numel() * 4 for t in a1.tensors.values())
        assert got == {a1.key: {"bytes": want, "token": None}, a2.key: {"bytes": want, "token": None}}
        out1 = greedy(eng, events, "r1", "Hello", a1.key)
        out2 = greedy(eng, events, "r2", "Hello", a2.key)
        assert out1 != base and out2 != base and out1 != out2
        # interleaved in one batch: each sequence with its own adapter, the base with none
        for k, ad in (("c1", a1.key), ("c2", a2.key), ("c0", None)):
            eng.submit(Request(k, "Hello", 12, SamplingParams(temperature=0), adapter=ad))
        ids = {"c1": [], "c2": [], "c0": []}
        ended = set()
        while len(ended) < 3:
            k, kind, body = events.get(timeout=30)
            if kind == "chunk":
                ids[k] += body["token_ids"]
            elif kind == "end":
                ended.add(k)
        assert (ids["c1"], ids["c2"], ids["c0"]) == (out1, out2, base)
        eng.drop_adapter(a1.key)
        assert greedy(eng, events, "b1", "Hello") == base
        eng.submit(Request("gone", "Hello", 4, SamplingParams(temperature=0), adapter=a1.key))
        assert next_of(events, "error")["name"] == errors.Cancelled.name
        assert greedy(eng, events, "r3", "Hello", a2.key) == out2
        assert a1.key not in eng.runner.adapters
    finally:
        eng.stop()
        eng.join(10)


def test_i11_3_an_adapter_that_does_not_fit_is_reported_not_installed():
    from llmosd.models import lora
    eng, events = start_engine()
    bad = lora.Adapter("sha256:" + "3" * 64, lora.LoraConfig(rank=2, alpha=2.0),
                       {"nonsense": torch.zeros(2, 2)}, None, None)
    try:
        eng.add_adapter(bad.key, bad)
        body = next_of(events, "adapter")
        assert body["error"]["name"] == errors.LoadFailed.name and "is missing" in body["error"]["message"]
        assert eng.runner.adapters == {}
    finally:
        eng.stop()
        eng.join(10)


def test_i11_4_a_merged_classifiers_own_head_serves_requests_without_adapter():
    from llmosd.models import lora
    from llmosd.models.classifier import head_logits
    head = torch.randn((3, 32), generator=torch.Generator().manual_seed(0))
    events = queue.Queue()
    model = tiny_model()
    eng = Engine(1, model, LetterTok(), torch.device("cpu"), lambda k, kind, body: events.put((k, kind, body)),
                 own_head=lora.Adapter("sha256:" + "4" * 64, None, None, head, ["x", "y", "z"]))
    assert eng.own_head_bytes == 3 * 32 * 4
    eng.start()
    try:
        eng.submit(Call("c", "classify_head", {"inputs": ["Hello"], "labels": None}))
        (res,) = next_of(events, "end")["results"]
        eng.submit(Call("z", "classify_head", {"inputs": ["Hello"], "labels": ["a", "b", "c"]}))
        err = next_of(events, "error")
    finally:
        eng.stop()
        eng.join(10)
    with torch.no_grad():
        want = head_logits(model, head, [LetterTok().encode("Hello")], torch.device("cpu"))[0]
    assert [res["scores"][k] for k in "xyz"] == pytest.approx(want.tolist(), abs=1e-5)
    assert res["label"] == "xyz"[int(want.argmax())]
    assert err["name"] == errors.InvalidArgument.name and "trained on the labels x, y, z" in err["message"]


# -- code review of the serving of adapters ---------------------------------------------------------

def test_i11_review_1_a_failed_install_leaves_nothing_behind_and_a_retry_works():
    from llmosd.models import lora
    from llmosd.models.loader import resident_bytes
    from llmosd.serve.runner import Runner
    runner = Runner(tiny_model(), LetterTok(), torch.device("cpu"))
    good = random_adapter(None, "sha256:" + "5" * 64, 1)
    last_b = [k for k in good.tensors if "lora_B" in k][-1]
    meta = torch.empty(good.tensors[last_b].shape, device="meta")     # its copy fails, like an OOM
    broken = lora.Adapter(good.key, good.lora, dict(good.tensors, **{last_b: meta}), None, None)
    bad_head = lora.Adapter(good.key, good.lora, good.tensors, torch.empty(2, 32, device="meta"), ["x", "y"])
    nbytes = resident_bytes(runner.model)
    for bad in (broken, bad_head):                  # LoRA fails part-way; LoRA in, then the head fails
        with pytest.raises(errors.LoadFailed, match="installing the adapter failed"):
            runner.install(good.key, bad)
        assert runner.adapters == {} and resident_bytes(runner.model) == nbytes
        assert not any(len(m.lora_A) for _, m in lora._lora_modules(runner.model))
    assert runner.install(good.key, good) == sum(t.numel() * 4 for t in good.tensors.values())
    assert list(runner.adapters) == [good.key]


# -- issue 12: swapping out keeps the model for a later engine ------------------------------------

def _greedy_ids(eng, events, key):
    eng.submit(Request(key, "abc", 5, SamplingParams(temperature=0)))
    ids = []
    while (got := events.get(timeout=10))[1] != "end":
        ids += got[2].get("token_ids", []) if got[1] == "chunk" else []
    return ids


def test_i12_2_an_engine_stopped_to_swap_keeps_its_runner_for_the_next_engine():
    eng, events = start_engine(stream_buffer=100)
    before = _greedy_ids(eng, events, "a")
    eng.stop(swap=True)
    eng.join(10)
    assert next_of(events, "stopped", timeout=5) == {"swapped": True}
    assert eng.runner.model is not None                   # kept (on the CPU: where it was)
    eng.runner.onload()
    again = queue.Queue()
    eng2 = Engine(1, None, eng.runner.tok, torch.device("cpu"),
                  lambda k, kind, body: again.put((k, kind, body)), runner=eng.runner)
    eng2.start()
    try:
        assert _greedy_ids(eng2, again, "b") == before and before
    finally:
        eng2.stop()
        eng2.join(10)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_i12_review_11_rss_drops_back_after_a_runner_closes():
    """A ~100 MB model built, run by a Runner and closed: the process's RSS comes back near
    where it started (glibc keeps freed heap unless trimmed; the bound is generous)."""
    from llmosd.models.loader import resident_bytes
    from llmosd.serve.runner import Runner
    cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                      eos_token_id=None)
    before = _rss()
    model = Llama(cfg)
    model.init_weights(seed=0)
    size = resident_bytes(model)
    assert size > 80_000_000
    runner = Runner(model.eval(), LetterTok(), torch.device("cpu"))
    del model
    assert _rss() - before > size // 2                  # it was resident
    runner.close()
    assert _rss() - before < size // 3


# -- issue 13: the batched engine over a paged KV pool ---------------------------------------------

@pytest.fixture
def one_thread():
    """One torch thread: OpenMP threads spin-wait, and on a shared, loaded machine a step of a
    tiny model then takes 100x longer (the daemon runs with its configured threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pool_engine(num_blocks, block_size=4, max_batch=4, max_waiting=8, max_prefill_tokens=8, start=True,
                stream_buffer=1000):
    events = queue.Queue()
    eng = Engine(1, tiny_model(), LetterTok(), torch.device("cpu"), lambda k, kind, body: events.put((k, kind, body)),
                 max_batch=max_batch, stream_buffer=stream_buffer, num_blocks=num_blocks, block_size=block_size,
                 max_waiting=max_waiting, max_prefill_tokens=max_prefill_tokens)
    if start:
        eng.start()
    return eng, events


def collect(events, keys, timeout=30):
    """{key: (token ids, end stats or error body)} once every key ended; and the blocks reports."""
    ids, done, reports = {k: [] for k in keys}, {}, []
    while len(done) < len(keys):
        k, kind, body = events.get(timeout=timeout)
        if kind == "chunk":
            ids[k] += body["token_ids"]
        elif kind in ("end", "error"):
            done[k] = (kind, body)
        elif kind == "blocks":
            reports.append(body)
    return {k: (ids[k], done[k]) for k in keys}, reports


def last_blocks(events, seen=(), quiet=0.5):
    """The engine's last blocks report (of ``seen`` and those still coming) once it is idle:
    it reports only changes, so the last one may have come already."""
    last = seen[-1] if seen else None
    while True:
        try:
            k, kind, body = events.get(timeout=quiet)
        except queue.Empty:
            return last
        if kind == "blocks":
            last = body


def test_i13_2_preempted_sequences_are_recomputed_with_the_same_greedy_output(one_thread):
    """A pool too small for four growing sequences at once: the newest are preempted and
    recomputed, each ends with exactly its solo greedy output, every block comes back."""
    prompts = {f"p{i}": "Hello " + "abcdefgh"[i] * (i + 1) for i in range(4)}
    solo = {}
    eng, events = pool_engine(num_blocks=64)
    try:
        for k, p in prompts.items():
            eng.submit(Request(k, p, 24, SamplingParams(temperature=0)))
            solo[k] = collect(events, [k])[0][k][0]
    finally:
        eng.stop()
        eng.join(10)
    eng, events = pool_engine(num_blocks=12)                    # 48 positions for 4 x ~35
    try:
        for k, p in prompts.items():
            eng.submit(Request(k, p, 24, SamplingParams(temperature=0)))
        got, reports = collect(events, list(prompts))
        assert last_blocks(events, reports)["kv_blocks_used"] == 0
    finally:
        eng.stop()
        eng.join(10)
    assert {k: v[0] for k, v in got.items()} == solo
    assert any(v[1][1].get("preempted") for v in got.values())
    assert all(v[1][0] == "end" and v[1][1]["generated_tokens"] == 24 for v in got.values())


def test_i13_2_cancel_frees_blocks_busy_past_max_waiting_and_prompts_beyond_the_pool(one_thread):
    eng, events = pool_engine(num_blocks=16, max_batch=1, max_waiting=2, start=False, stream_buffer=2)
    try:
        # arriving together: two may wait, the others are refused at once with Busy naming
        # max_waiting; later one runs (until its reader lags: it keeps its blocks) and one waits
        for k in "abcd":
            eng.submit(Request(k, "Hello", 10_000, SamplingParams(temperature=0)))
        eng.start()
        busy, _ = collect(events, ["c", "d"])
        for kind, body in (v[1] for v in busy.values()):
            assert body["name"] == errors.Busy.name and "max_waiting" in body["message"] + body["hint"]
        eng.submit(Request("e", "Hello", 10_000, SamplingParams(temperature=0)))
        for k in "abe":
            eng.cancel(k, "cancelled by the client")
        got, reports = collect(events, list("abe"))
        assert all(v[1][1]["finish_reason"] == "cancelled by the client" for v in got.values()), got
        assert last_blocks(events, reports) == {"kv_blocks_total": 16, "kv_blocks_used": 0, "kv_block_size": 4,
                                            "waiting": 0, "running": 0}
        # 64 positions: a prompt of 70 tokens can never run here
        eng.submit(Request("long", "x" * 69, 4, SamplingParams(temperature=0)))
        kind, body = collect(events, ["long"])[0]["long"][1]
        assert kind == "error" and body["name"] == errors.InvalidArgument.name
        assert "70 positions" in body["message"] and "64" in body["message"] and "max_kv_bytes" in body["hint"]
    finally:
        eng.stop()
        eng.join(10)
