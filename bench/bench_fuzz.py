"""The long fuzz run (issue 14, acceptance 4): random and mutated protocol messages of every
type at a running daemon, with the generator of tests/e2e/test_fuzz.py (the CI run is that
test, bounded at 2,000 messages; this one sends 10,000 or more).

    python bench/bench_fuzz.py [--examples 10000] [--seed 0] [--out bench/results/fuzz.json]

One message in ``--legal`` (default 10) is instead a legal generate, chat or score on the
loaded model with random sampling settings, so the engine works between the hostile ones.

Checks, as the test does: every reply well formed, never ``internal``, the daemon alive at
the end, its RSS and open descriptors flat (the end against a warm baseline taken after 300
messages).  Prints a summary and writes it as JSON; exit status 1 if a check failed.
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

RSS_SLACK = 48 * 2 ** 20       # the test's bounds: flat means within these of the baseline
FD_SLACK = 8
WARM = 300                     # messages before the baseline (model loaded, caches filled)


def legal_request():
    """A strategy: a well-formed generate, chat or score on 'tiny' with random legal settings
    (short: at most 6 tokens)."""
    from hypothesis import strategies as st
    text = st.text(min_size=1, max_size=40)
    sampling = {"temperature": st.floats(0, 2), "top_k": st.integers(0, 50),
                "top_p": st.floats(0.05, 1), "min_p": st.floats(0, 0.5),
                "repetition_penalty": st.floats(0.5, 2), "seed": st.integers(0, 2 ** 32),
                "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2),
                "logprobs": st.integers(0, 3)}
    gen = st.fixed_dictionaries({"model": st.just("tiny"), "prompt": text,
                                 "max_tokens": st.integers(1, 6)}, optional=sampling)
    chat = st.fixed_dictionaries(
        {"model": st.just("tiny"), "max_tokens": st.integers(1, 6),
         "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                     "content": text}), min_size=1, max_size=3)},
        optional=sampling)
    score = st.fixed_dictionaries({"model": st.just("tiny"), "text": text})
    return st.one_of(gen.map(lambda b: ("generate", b)), chat.map(lambda b: ("chat", b)),
                     score.map(lambda b: ("score", b))).map(
        lambda tb: ({"v": 1, "type": tb[0], "body": tb[1]}, True))


def run(examples: int, seed: int, legal_every: int = 10) -> dict:
    """Start a daemon, fuzz it, stop it; the summary (``ok`` says whether every check held)."""
    import msgpack
    from hypothesis import HealthCheck, given, settings, strategies as st
    from hypothesis import seed as hseed

    from conftest import SHAKESPEARE, TINY, Daemon
    from test_fuzz import Wire, _usage, message

    d = Daemon(Path(tempfile.mkdtemp(prefix="llmosd-fuzz-")), env={"LLMOSD_HEARTBEAT_MS": "300"})
    out: dict = {"examples": examples, "seed": seed, "legal_every": legal_every, "sent": 0,
                 "failures": []}
    mixed = st.integers(1, max(1, legal_every)).flatmap(
        lambda n: legal_request() if n == 1 and legal_every else message())
    usage: list[tuple[int, int, int]] = []          # (messages sent, rss, fds)
    try:
        d.start()
        d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE))
        d.cli("load", "tiny")
        wire = Wire(d.sock)
        t0 = time.monotonic()

        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(mixed)
        def one(m):
            frames, structured = m
            rid = None
            if structured:
                rid, wire.next_id = wire.next_id, wire.next_id + 1
                frames["id"] = rid
                frames = [msgpack.packb(frames, use_bin_type=True)]
            wire.exchange(frames, rid)
            out["sent"] += 1
            if out["sent"] == WARM or out["sent"] % 1000 == 0:
                usage.append((out["sent"], *_usage(d.proc.pid)))

        try:
            one()
        except Exception as e:           # a failed check: hypothesis re-raises the first one
            out["failures"].append(f"{type(e).__name__}: {str(e)[:2000]}")
        out["seconds"] = round(time.monotonic() - t0, 1)
        alive = d.proc.poll() is None
        if alive:
            time.sleep(1.0)              # abandoned uploads and beats settle
            usage.append((out["sent"], *_usage(d.proc.pid)))
            with d.client() as c:
                alive = c.status()["pid"] == d.proc.pid
                out["daemon_requests"], out["daemon_ok_by_type"] = _requests(c.metrics())
        wire.close()
        out["alive"] = alive
        out["replies"] = dict(sorted(wire.seen.items()))
    finally:
        d.stop()
    return summarize(out, usage)


def _requests(text: str) -> tuple[dict, dict]:
    """The daemon's own count of answers (llmosd_requests_total): by result, and the ok ones
    by type."""
    from prometheus_client.parser import text_string_to_metric_families
    by: dict[str, int] = {}
    ok: dict[str, int] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "llmosd_requests_total":
                by[s.labels["result"]] = by.get(s.labels["result"], 0) + int(s.value)
                if s.labels["result"] == "ok":
                    ok[s.labels["type"]] = int(s.value)
    return dict(sorted(by.items())), dict(sorted(ok.items()))


def summarize(out: dict, usage: list[tuple[int, int, int]]) -> dict:
    """Add the usage samples and the verdicts: rss/fds flat against the warm baseline."""
    base = next((u for u in usage if u[0] >= WARM), None)
    end = usage[-1] if usage else None
    out["usage"] = [{"sent": n, "rss_bytes": rss, "fds": fds} for n, rss, fds in usage]
    out["rss_growth_bytes"] = end[1] - base[1] if base and end else None
    out["fd_growth"] = end[2] - base[2] if base and end else None
    checks = {
        "enough_messages": out["sent"] >= out["examples"],
        "no_failed_reply": not out["failures"],
        "no_internal": out.get("replies", {}).get("internal", 0) == 0
                       and out.get("daemon_requests", {}).get("internal", 0) == 0,
        "alive": bool(out.get("alive")),
        "generations_ran": out.get("daemon_ok_by_type", {}).get("generate", 0) > 0
                           or not out.get("legal_every"),
        "rss_flat": out["rss_growth_bytes"] is not None and out["rss_growth_bytes"] <= RSS_SLACK,
        "fds_flat": out["fd_growth"] is not None and out["fd_growth"] <= FD_SLACK,
    }
    out["checks"], out["ok"] = checks, all(checks.values())
    out["host"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--legal", type=int, default=10, metavar="N",
                    help="one message in N is a legal generation (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    a = ap.parse_args()
    out = run(a.examples, a.seed, a.legal)
    rate = out["sent"] / out["seconds"] if out.get("seconds") else 0
    print(f"fuzz: {out['sent']} messages in {out.get('seconds')} s ({rate:.0f}/s); "
          f"daemon {'alive' if out.get('alive') else 'DEAD'}; RSS {_mib(out['rss_growth_bytes'])} "
          f"and {out['fd_growth']} descriptor(s) since message {WARM}")
    print("replies: " + ", ".join(f"{k} {v}" for k, v in out.get("replies", {}).items()))
    for name, good in out["checks"].items():
        print(f"  {'ok  ' if good else 'FAIL'} {name}")
    for f in out["failures"]:
        print("  failure: " + f.splitlines()[0])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0 if out["ok"] else 1


def _mib(n) -> str:
    return "?" if n is None else f"{n / 2 ** 20:+.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
