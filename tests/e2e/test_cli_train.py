"""Issue 10 through the command line and a real daemon: train a tiny character-level model on
a slice of Shakespeare, follow it, list it, read its logs and plot, generate from the result;
Ctrl-C under --wait detaches; refusals at submit queue nothing; an exported torchrun job runs
locally and its output imports back with its lineage."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHAKESPEARE, Daemon

# The job system and pretraining land with the daemon side (K) and the training side (J).
pytest.importorskip("llmosd.train.pretrain")

ARCH = ["--tokenizer", "char", "--layers", "2", "--dim", "64", "--heads", "4", "--block-size", "32",
        "--batch-size", "8", "--device", "cpu", "--seed", "1"]
RUN = ["--max-steps", "30", "--eval-every", "10", "--eval-batches", "2", "--lr", "3e-3", "--warmup", "3"]
FULL = ["--max-steps", "150", "--eval-every", "50", "--eval-batches", "4", "--lr", "3e-3", "--warmup", "15"]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    dm = Daemon(tmp_path_factory.mktemp("train"))
    dm.outlives_test = True
    try:
        yield dm.start()
    finally:
        dm.stop()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    p.write_text(SHAKESPEARE.read_text()[:100_000])
    return p


def all_jobs(d) -> list[dict]:
    return json.loads(d.cli("jobs", "--all", "--json").stdout)


def test_i10_1_train_wait_json_jobs_logs_plot_generate(d, text, tmp_path):
    # acceptance 1, through the daemon: validation loss well below the text's unigram
    # character entropy (3.31 nats); the result generates text (below)
    r = d.cli("train", "tiny-char", "--data", str(text), *ARCH, *FULL, "--wait", "--json", timeout=600)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    first, reports, last = lines[0], lines[1:-1], lines[-1]
    job = first["job_id"]
    assert isinstance(job, int) and first["model"].startswith("tiny-char")
    assert reports and all({"step", "loss", "tokens_per_s", "eta_s"} <= set(m) for m in reports)
    assert [m["step"] for m in reports] == sorted(m["step"] for m in reports)
    assert any(m.get("val_loss") is not None for m in reports)
    assert last["job_id"] == job and last["state"] == "succeeded" and last["step"] == 150
    assert last["val_loss"] < 3.0 < 3.31, last
    assert reports[-1]["loss"] < reports[0]["loss"]

    rows = {row["job_id"]: row for row in all_jobs(d)}
    assert rows[job]["state"] == "succeeded" and rows[job]["max_steps"] == 150
    assert {"job_id", "state", "step", "max_steps", "model"} <= set(rows[job])
    assert job not in {row["job_id"] for row in json.loads(d.cli("jobs", "--json").stdout)}  # finished

    logged = [json.loads(line) for line in d.cli("logs", str(job), "--json").stdout.splitlines()]
    assert sum("metrics" in c for c in logged) == len(reports)
    assert logged[-1]["job"]["state"] == "succeeded"
    table = d.cli("jobs", "--all").stdout
    assert "tiny-char" in table and "succeeded" in table and "150/150" in table

    png = tmp_path / "loss.png"
    if os.environ.get("LLMCTL_PLOT_KEEP"):       # to look at the picture: a path to copy it to
        png = Path(os.environ["LLMCTL_PLOT_KEEP"])
    pytest.importorskip("matplotlib")
    out = d.cli("logs", str(job), "--plot", str(png)).stdout
    assert png.read_bytes()[:4] == b"\x89PNG" and "validation points" in out

    gen = d.cli("generate", "tiny-char", "ROMEO:", "--max-tokens", "20", "--temperature", "0.8",
                "--seed", "1")
    assert len(gen.stdout) >= 10                 # 20 characters
    show = json.loads(d.cli("show", "tiny-char", "--json").stdout)
    lineage = show["manifest"]["lineage"]
    assert lineage["method"] == "train" and lineage["job"] == job
    assert list(lineage["args"]["sources"]) == ["shakespeare.txt"]
    assert "trained by:    job" in d.cli("show", "tiny-char").stdout

    assert d.cli("jobs", "rm", str(job)).stdout == f"removed job {job}\n"
    assert job not in {row["job_id"] for row in all_jobs(d)}


def test_i10_ctrl_c_under_wait_detaches_then_cancel(d, text):
    p = subprocess.Popen([sys.executable, "-m", "llmctl.cli", "train", "detach-me", "--data", str(text),
                          *ARCH, "--max-steps", "100000", "--wait"],
                         env=d.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        job = int(p.stdout.readline())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:            # wait until it really runs
            row = {r["job_id"]: r for r in all_jobs(d)}[job]
            if row["state"] == "running" and row["step"]:
                break
            time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130
    assert f"detached; the job goes on: llmctl logs -f {job}" in err
    assert {r["job_id"]: r for r in all_jobs(d)}[job]["state"] == "running"
    assert d.cli("cancel", str(job)).returncode == 0
    r = d.cli("logs", "-f", str(job), "--json", timeout=60)
    assert json.loads(r.stdout.splitlines()[-1])["job"]["state"] == "cancelled"
    assert "detach-me" not in d.cli("ls").stdout                    # no partial model


def test_i10_refused_at_submit_nothing_queued(d, text, tmp_path):
    before = all_jobs(d)
    r = d.cli("train", "x", "--data", str(tmp_path / "missing.txt"), *ARCH, check=False)
    assert r.returncode == 66 and "missing.txt" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    r = d.cli("train", "x", "--data", str(bad), *ARCH, check=False)
    assert r.returncode == 65 and "line 2" in r.stderr and len(r.stderr.splitlines()) <= 2
    assert all_jobs(d) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_i10_5_exported_torchrun_job_runs_locally_and_imports_back(d, text, tmp_path):
    pytest.importorskip("llmosd.train.entry")
    dest = tmp_path / "job"
    d.cli("train", "exported", "--data", str(text), *ARCH, *RUN, "--export", "torchrun", str(dest))
    env = {**d.env, "RDZV_ENDPOINT": f"localhost:{_free_port()}",      # torchrun beside our python
           "PATH": os.path.dirname(sys.executable) + os.pathsep + d.env.get("PATH", "")}
    p = subprocess.Popen(["bash", str(dest / "run.sh")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=300)
    finally:                                   # torchrun and its ranks: the whole group
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, out[-4000:]
    assert (dest / "output" / "config.json").exists()
    d.cli("import", str(dest / "output"), "exported")
    lineage = json.loads(d.cli("show", "exported", "--json").stdout)["manifest"]["lineage"]
    assert "train" in json.dumps(lineage) and "shakespeare.txt" in json.dumps(lineage)
    assert d.cli("generate", "exported", "ROMEO:", "--max-tokens", "5", "--temperature", "0").stdout
