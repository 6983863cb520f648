"""Worker processes of bench/bench_engine.py: one per peer (llama.cpp, transformers) and one for
llmosd's engine in-process, each kept for a whole bench run and driven by one-line JSON commands
on stdin, so the orchestrator can interleave the systems' runs.

    python bench/engine_workers.py llamacpp|transformers|inproc cpu|cuda

Every runner answers ``run(texts, n)`` -> {prompt_tokens, tokens, first_s, last_s, end_s}: greedy,
``n`` new tokens per text (all texts at once), seconds from the start of the run to the first
token, the last token and the end; ``load(...)`` -> {seconds, ...}.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CALL_TIMEOUT = 900.0         # s: a worker command that takes longer is a hung peer


def rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class LlamaCppPeer:
    def __init__(self, device: str):
        import llama_cpp
        self.lc, self.llm, self.ctxs, self.device = llama_cpp, None, {}, device

    def load(self, path: str, threads: int) -> dict:
        self.close()
        t0 = time.perf_counter()
        self.llm = self.lc.Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                 n_gpu_layers=-1 if self.device == "cuda" else 0, verbose=False)
        secs = time.perf_counter() - t0
        self.threads, vocab = threads, self.lc.llama_model_get_vocab(self.llm._model.model)
        self.n_vocab = self.lc.llama_vocab_n_tokens(vocab)
        return {"seconds": secs, "version": self.lc.__version__}

    def close(self) -> None:
        for ctx, batch in self.ctxs.values():
            self.lc.llama_batch_free(batch)
            self.lc.llama_free(ctx)
        self.ctxs, self.llm = {}, None

    def _context(self, n_seq: int, n_ctx: int):
        """A context with ``n_seq`` sequences of ``n_ctx`` positions each, kept for reuse (a
        llama.cpp server keeps its context too)."""
        if (n_seq, n_ctx) not in self.ctxs:
            p = self.lc.llama_context_default_params()
            p.n_ctx, p.n_seq_max, p.n_batch, p.n_ubatch = n_ctx * n_seq, n_seq, 2048, 512
            p.n_threads = p.n_threads_batch = self.threads
            ctx = self.lc.llama_init_from_model(self.llm._model.model, p)
            self.ctxs[(n_seq, n_ctx)] = (ctx, self.lc.llama_batch_init(2048, 0, n_seq))
        ctx, batch = self.ctxs[(n_seq, n_ctx)]
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        return ctx, batch

    def run(self, texts: list[str], n: int) -> dict:
        import numpy as np
        lc = self.lc
        prompts = [self.llm.tokenize(t.encode()) for t in texts]
        longest = max(map(len, prompts)) + n
        ctx, batch = self._context(len(prompts), -(-longest // 256) * 256)
        t0 = time.perf_counter()

        def decode(items):             # [(token, pos, seq, wants logits)] in batches of 2048
            picked = {}
            for i in range(0, len(items), 2048):
                batch.n_tokens, rows = 0, {}
                for j, (tok, pos, seq, logits) in enumerate(items[i:i + 2048]):
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
                    batch.seq_id[j][0], batch.logits[j] = seq, logits
                    if logits:
                        rows[seq] = j
                    batch.n_tokens = j + 1
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                for seq, j in rows.items():     # greedy, read before the next batch overwrites
                    picked[seq] = int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, j),
                                                            shape=(self.n_vocab,)).argmax())
            return [picked[s] for s in range(len(prompts))]
        toks = decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
        first = last = time.perf_counter() - t0
        pos, made = [len(p) for p in prompts], len(prompts)
        for _ in range(n - 1):
            toks = decode([(t, pos[s], s, True) for s, t in enumerate(toks)])
            pos = [p + 1 for p in pos]
            made += len(prompts)
            last = time.perf_counter() - t0
        return {"prompt_tokens": sum(map(len, prompts)), "tokens": made, "first_s": first,
                "last_s": last, "end_s": last}


class TransformersPeer:
    def __init__(self, device: str):
        import torch
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.torch, self.tf, self.device, self.model = torch, transformers, device, None

    def load(self, path: str, threads: int) -> dict:
        self.torch.set_num_threads(threads)
        self.model = None
        d, f = os.path.split(path)
        t0 = time.perf_counter()
        dtype = self.torch.float32 if self.device == "cpu" else self.torch.bfloat16
        self.model = self.tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).to(self.device).eval()
        secs = time.perf_counter() - t0
        self.tok = self.tf.AutoTokenizer.from_pretrained(d, gguf_file=f)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        return {"seconds": secs, "version": self.tf.__version__}

    def run(self, texts: list[str], n: int) -> dict:
        from transformers.generation.streamers import BaseStreamer
        enc = self.tok(texts, return_tensors="pt", padding=True).to(self.device)
        stamps: list[float] = []

        class Stamps(BaseStreamer):      # put() gets the prompt first, then each step's tokens
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass
        sync = self.torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        with self.torch.no_grad():
            sync()
            t0 = time.perf_counter()
            out = self.model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id, streamer=Stamps())
            sync()
            end = time.perf_counter() - t0
        made = (out.shape[1] - enc["input_ids"].shape[1]) * len(texts)
        return {"prompt_tokens": int(enc["attention_mask"].sum()), "tokens": made,
                "first_s": stamps[1] - t0, "last_s": stamps[-1] - t0, "end_s": end}


class InProcessEngine:
    """llmosd's engine in this process, fed ``Request``s directly (no socket, no control loop)."""

    def __init__(self, device: str):
        import torch
        self.torch, self.device, self.engine = torch, device, None

    def load(self, store_root: str, model: str, threads: int) -> dict:
        import inspect
        import queue
        from llmosd.models.loader import load_model
        from llmosd.serve.engine import Engine
        from llmosd.store.store import Store
        self.torch.set_num_threads(threads)
        store = Store(store_root)
        _, man, _ = store.get(model)
        t0 = time.perf_counter()
        device = self.torch.device(self.device)
        net, tok = load_model(store, man, device, self.torch.float32 if self.device == "cpu" else self.torch.bfloat16)
        self.q = queue.Queue()
        from llmosd.config import Config
        cfg, accepted = Config(), inspect.signature(Engine).parameters   # the daemon's defaults
        opts = {"max_batch": cfg.max_batch, "stream_buffer": cfg.stream_buffer, "compile": cfg.compile,
                "max_prefill_tokens": cfg.max_prefill_tokens, "max_waiting": cfg.max_waiting,
                "block_size": cfg.kv_block_size}
        opts = {k: v for k, v in opts.items() if k in accepted}
        self.engine = Engine(1, net, tok, device, lambda key, kind, body: self.q.put((key, kind, body)), **opts)
        self.engine.start()
        self.n = 0
        return {"seconds": time.perf_counter() - t0}

    def run(self, texts: list[str], n: int) -> dict:
        from llmosd.serve.request import Request, SamplingParams
        assert len(texts) == 1, "the in-process engine runs one stream"
        self.n += 1
        t0 = time.perf_counter()
        self.engine.submit(Request(key=self.n, prompt=texts[0], max_tokens=n, sampling=SamplingParams(temperature=0.0)))
        made, first, last = 0, None, None
        while True:
            key, kind, body = self.q.get(timeout=CALL_TIMEOUT)
            if key != self.n:
                continue
            if kind == "chunk":
                self.engine.credit(key)
                if body.get("token_ids"):
                    made += len(body["token_ids"])
                    last = time.perf_counter() - t0
                    first = last if first is None else first
            elif kind == "end":
                return {"prompt_tokens": body.get("prompt_tokens"), "tokens": made, "first_s": first,
                        "last_s": last, "end_s": time.perf_counter() - t0, "first_chunk_tokens": None}
            else:
                raise RuntimeError(f"engine: {kind} {body}")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine.join(30)


WORKERS = {"llamacpp": LlamaCppPeer, "transformers": TransformersPeer, "inproc": InProcessEngine}


def worker_main(kind: str, device: str) -> int:
    """Serve JSON commands on stdin ({"op": method, **args}), one JSON answer a line on the
    original stdout ({"ok": result} or {"error": text}); libraries' prints go to stderr."""
    os.environ.setdefault("TQDM_DISABLE", "1")       # transformers' GGUF conversion bars
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        peer = WORKERS[kind](device)
    except Exception as e:  # noqa: BLE001 - a peer that is not installed: said once, then every answer
        peer, why = None, f"{type(e).__name__}: {e}"
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if peer is None:
                raise RuntimeError(why)
            op = cmd.pop("op")
            res = {"ok": os.getpid() if op == "ready" else getattr(peer, op)(**cmd)}
        except Exception as e:  # noqa: BLE001 - reported to the orchestrator, which records it
            res = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(res) + "\n")
        out.flush()
    if peer is not None and hasattr(peer, "close"):
        peer.close()
    return 0


class Worker:
    """The orchestrator's handle on a worker process."""

    def __init__(self, kind: str, device: str):
        self.kind = kind
        self.p = subprocess.Popen([sys.executable, __file__, kind, device],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.p.pid

    def call(self, op: str, **args):
        self.p.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.p.stdin.flush()
        if not select.select([self.p.stdout], [], [], CALL_TIMEOUT)[0]:
            self.stop()
            raise RuntimeError(f"{self.kind} worker: no answer to {op} within {CALL_TIMEOUT:g}s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker exited (status {self.p.wait()})")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"{self.kind}: {res['error']}")
        return res["ok"]

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
                self.p.wait(30)
            except Exception:  # noqa: BLE001 - it hangs or its pipe is gone: kill it
                self.p.kill()
                self.p.wait()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
