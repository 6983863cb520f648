"""Pretraining: llmosd's training job vs a plain PyTorch loop, on the classic character-level
Shakespeare baseline, in one run, reported as validation losses and a tokens/s ratio.

    python bench/bench_train.py [--iters 2000] [--threads N] [--device cpu] [--out FILE]

The configuration is nanoGPT's CPU baseline (published validation loss about 1.88): a char
tokenizer, 4 layers, 4 heads, width 128, block 64, batch 12, ``--iters`` iterations, dropout 0,
lr 1e-3 decaying to 1e-4 after 100 warmup steps, weight decay 0.1, clipping at 1.0, evaluation
every 250 steps on 20 batches.  Both sides train the same model class (``models.llama``) from
the same initial weights on the same token stream (the job's tokenizer, packing and split):

- llmosd: ``train.pretrain.run`` in this process with a fake ``ctl`` (what the daemon's worker
  calls), checkpoints included;
- plain: a nanoGPT-style loop (torch.randint batches, AdamW, the same schedule), no checkpoints.

Tokens/s count the training loop only (from the first to the last step, evaluations included),
after 30 warm-up steps of a throwaway plain run (torch's first steps are several times slower);
the validation loss is measured once more for both on the whole validation split, in
non-overlapping blocks, so the two figures compare.  Goal: llmosd's loss <= 1.89 and its
tokens/s >= 1.0x the plain loop's.  Results: printed, and written to bench/results/train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"   # public domain, in the repository


def spec_of(a) -> dict:
    return {"tokenizer": "char", "layers": 4, "heads": 4, "kv_heads": 4, "dim": 128, "block_size": 64,
            "batch_size": 12, "max_steps": a.iters, "lr": 1e-3, "min_lr": 1e-4,
            "warmup": min(100, a.iters // 10), "weight_decay": 0.1, "dropout": 0.0,
            "eval_every": min(250, a.iters), "eval_batches": 20,
            "checkpoint_every": min(250, a.iters), "seed": a.seed, "device": a.device,
            "dtype": "float32"}


class BenchCtl:
    """What the daemon gives a job: here it records the loop's start, end and reports."""

    def __init__(self, job_dir: str):
        self.job_id, self.job_dir = 1, job_dir
        self.start = self.end = None
        self.metrics_seen: list[dict] = []

    def progress(self, p):
        if p.get("stage") == "train":
            self.start = time.perf_counter()

    __call__ = progress

    def metrics(self, m):
        self.metrics_seen.append(m)

    def log(self, line):
        print("  llmosd:", line, flush=True)

    def checkpoint_saved(self, step):
        self.end = time.perf_counter()

    def stop_requested(self):
        return None


def run_llmosd(a, spec: dict, tmp: Path) -> dict:
    from llmosd.store.store import Store
    from llmosd.train import pretrain
    store = Store(str(tmp / "store"))
    digest, _ = store.put_blob(SHAKESPEARE.read_bytes())
    os.makedirs(tmp / "job", exist_ok=True)
    ctl = BenchCtl(str(tmp / "job"))
    t0 = time.perf_counter()
    man = pretrain.run({**spec, "data": {"tinyshakespeare.txt": digest}}, str(tmp / "store"), ctl)
    wall = time.perf_counter() - t0
    from safetensors.torch import load
    sd = load(store.read_blob(man["weights"]["digest"]))
    return {"final": man["lineage"]["final"], "loop_s": ctl.end - ctl.start, "run_s": wall, "weights": sd}


def tokens(spec: dict):
    """The job's token stream (same tokenizer, packing and split)."""
    from llmosd.models.loader import build_tokenizer
    from llmosd.train import data as D
    docs = D.documents({"tinyshakespeare.txt": SHAKESPEARE.read_bytes()})
    tok = build_tokenizer("sentencepiece", D.train_tokenizer(docs, "char", None, spec["seed"]),
                          {"tokenizer": {"add_bos": False}})
    train, val = D.split(D.pack(tok, docs, add_bos=True))
    return tok, train.astype("int64"), val.astype("int64")


def run_plain(a, spec: dict, tok, train, val) -> dict:
    """nanoGPT's loop, written plainly, on the same model class and initial weights."""
    import torch
    import torch.nn.functional as F

    from llmosd.models.llama import Llama
    from llmosd.train.pretrain import lr_at, new_config
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    torch.manual_seed(spec["seed"])
    model = Llama(new_config(spec, tok))
    model.init_weights(spec["seed"])
    model.to(dev).train()
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": spec["weight_decay"]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.95))
    train_t, val_t = torch.from_numpy(train), torch.from_numpy(val)
    B, T = spec["batch_size"], spec["block_size"]

    def batch(data):
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
        return x.to(dev), y.to(dev)

    def loss_of(x, y):
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    t0, val_loss = time.perf_counter(), None
    for it in range(spec["max_steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, spec)
        x, y = batch(train_t)
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % spec["eval_every"] == 0 or it + 1 == spec["max_steps"]:
            model.eval()
            with torch.no_grad():
                val_loss = sum(loss_of(*batch(val_t)).item() for _ in range(spec["eval_batches"])) / spec["eval_batches"]
            model.train()
            print(f"  plain: step {it + 1}: validation loss {val_loss:.4f}", flush=True)
    return {"final": {"val_loss": val_loss, "loss": loss.item()}, "loop_s": time.perf_counter() - t0,
            "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def full_val_loss(spec: dict, tok, weights: dict, val) -> float:
    """Mean loss over the whole validation split in non-overlapping blocks (same for both)."""
    import torch
    import torch.nn.functional as F

    from llmosd.models.llama import Llama
    from llmosd.train.pretrain import new_config
    model = Llama(new_config(spec, tok))
    model.load_weights(weights)
    model.eval()
    T = spec["block_size"]
    n = (len(val) - 1) // T
    x = torch.from_numpy(val[:n * T]).view(n, T)
    y = torch.from_numpy(val[1:n * T + 1]).view(n, T)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 256):
            logits = model(x[i:i + 256])
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i:i + 256].reshape(-1),
                                     reduction="sum").item()
    return total / (n * T)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = spec_of(a)
    tok, train, val = tokens(spec)
    print(f"char vocabulary {tok.vocab_size}, {len(train):,} training and {len(val):,} validation "
          f"tokens; {a.iters} iterations, {torch.get_num_threads()} threads", flush=True)
    run_plain(a, {**spec, "max_steps": 30, "eval_every": 30, "eval_batches": 1}, tok, train, val)
    print("  (warm-up done: torch's first steps are slow, and neither side should pay for them)")
    with tempfile.TemporaryDirectory(prefix="llmosd-bench-train-") as tmp:
        ours = run_llmosd(a, spec, Path(tmp))
    plain = run_plain(a, spec, tok, train, val)
    tokens_run = a.iters * spec["batch_size"] * spec["block_size"]
    res = {"config": spec, "iters": a.iters, "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"}
    for name, r in (("llmosd", ours), ("plain", plain)):
        res[name] = {"val_loss_in_run": r["final"]["val_loss"],
                     "val_loss_full_split": full_val_loss(spec, tok, r["weights"], val),
                     "tokens_per_s": tokens_run / r["loop_s"], "loop_s": r["loop_s"]}
    res["llmosd"]["run_s"] = ours["run_s"]
    res["tokens_per_s_ratio"] = res["llmosd"]["tokens_per_s"] / res["plain"]["tokens_per_s"]
    res["goal"] = {"val_loss_at_most": 1.89, "ratio_at_least": 1.0,
                   "met": res["llmosd"]["val_loss_full_split"] <= 1.89 and res["tokens_per_s_ratio"] >= 1.0}
    for name in ("llmosd", "plain"):
        r = res[name]
        print(f"{name:7s} val loss {r['val_loss_in_run']:.4f} (in run), {r['val_loss_full_split']:.4f} "
              f"(whole split); {r['tokens_per_s']:,.0f} tokens/s over {r['loop_s']:.1f} s")
    print(f"tokens/s ratio llmosd/plain: {res['tokens_per_s_ratio']:.3f}; goal met: {res['goal']['met']}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("written to", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
