"""Issue 11 through the command line and a real daemon: fine-tune a tiny base with LoRA and
follow it, list the adapter with its base, evaluate it, merge it, export it as PEFT and import
it back with --base, refuse rm of its base unless --force; a classifier; refusals at submit
queue nothing; Ctrl-C cancels an evaluation; an exported LoRA job runs locally and its
PEFT output imports back."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import SHAKESPEARE, TINY, Daemon

# The daemon side of fine-tuning (ops.finetune, train.finetune) lands with helpers B2 and D.
pytest.importorskip("llmosd.train.finetune")
pytest.importorskip("llmosd.ops.finetune")

WORDS = sorted({"".join(random.Random(i).choice("abcdefgh") for _ in range(3)) for i in range(60)})
QUICK = ["--batch-size", "4", "--block-size", "16", "--device", "cpu", "--seed", "1", "--warmup", "0",
         "--eval-samples", "4"]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    dm = Daemon(tmp_path_factory.mktemp("finetune"))
    dm.outlives_test = True
    try:
        dm.start()
        dm.cli("create", "base", *TINY, "--context", "64", "--vocab-from", str(SHAKESPEARE), "--seed", "1")
        yield dm
    finally:
        dm.stop()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl",
                       [{"prompt": w + "=", "completion": w[::-1]} for w in WORDS[:40]])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "labels.jsonl",
                       [{"text": w, "label": "early" if w[-1] in "abcd" else "late"} for w in WORDS])


def all_jobs(d) -> list[dict]:
    return json.loads(d.cli("jobs", "--all", "--json").stdout)


def models(d) -> dict[str, dict]:
    return {m["model"]: m for m in json.loads(d.cli("ls", "--json").stdout)}


def test_i11_cli_lora_finetune_eval_merge_export_import_rm(d, qa, tmp_path):
    r = d.cli("finetune", "base", "qa", "--data", str(qa), "--method", "lora", "--rank", "4",
              "--targets", "q_proj,v_proj", "--max-steps", "6", "--eval-every", "3", *QUICK,
              "--wait", "--json", timeout=300)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    first, reports, last = lines[0], lines[1:-1], lines[-1]
    assert first["kind"] == "finetune" and first["model"].startswith("qa")
    assert last["state"] == "succeeded" and last["step"] == 6, last
    assert any(m.get("val_loss") is not None for m in reports)

    # ls: the adapter with its base, in the table and in --json
    row = models(d)["qa:latest"]
    assert row["kind"] == "adapter" and row["base"] == "base:latest"
    assert "adapter of base:latest" in d.cli("ls").stdout
    assert "kind:          adapter of base:latest" in d.cli("show", "qa").stdout

    # eval: a table, and --json with the metrics prompt/completion data allows
    table = d.cli("eval", "qa", "--data", str(qa), "--eval-samples", "4", "--device", "cpu", timeout=300).stdout
    assert table.startswith("METRIC") and "perplexity" in table and "examples, model qa:latest" in table
    res = json.loads(d.cli("eval", "base", "--data", str(qa), "--metric", "loss", "--metric", "exact_match",
                           "--eval-samples", "4", "--device", "cpu", "--json", timeout=300).stdout)
    assert res["model"] == "base:latest" and set(res["metrics"]) == {"loss", "exact_match"}
    assert res["examples"] and isinstance(res["job"], int)

    # merge: a standalone model
    out = d.cli("merge", "qa", "qa-merged", timeout=300).stdout
    assert out.startswith("merged qa-merged:latest") and "from qa" in out
    assert models(d)["qa-merged:latest"].get("base") is None

    # export: a PEFT directory, imported back as an adapter of base
    peft = tmp_path / "peft"
    out = d.cli("export", "qa", str(peft)).stdout
    assert "as a PEFT adapter" in out
    assert sorted(p.name for p in peft.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    r = d.cli("import", str(peft), "qa2", check=False)
    assert r.returncode == 64 and "--base MODEL" in r.stderr
    assert "an adapter of base" in d.cli("import", str(peft), "qa2", "--base", "base", timeout=300).stdout
    assert models(d)["qa2:latest"]["base"] == "base:latest"

    # rm of the base: refused naming its adapters, then --force removes them too
    r = d.cli("rm", "base", check=False)
    assert r.returncode != 0 and "qa" in r.stderr
    assert "base:latest" in models(d)
    out = d.cli("rm", "--force", "base").stdout
    assert "also removed" in out and "qa:latest" in out and "qa2:latest" in out
    left = models(d)
    assert "qa:latest" not in left and "qa2:latest" not in left and "qa-merged:latest" in left
    d.cli("create", "base", *TINY, "--context", "64", "--vocab-from", str(SHAKESPEARE), "--seed", "1")


def test_i11_cli_classifier_on_a_frozen_base(d, labelled):
    r = d.cli("finetune", "base", "sorter", "--data", str(labelled), "--method", "classify", "--head-only",
              "--labels", "early,late", "--max-steps", "4", "--eval-every", "2", *QUICK, "--wait",
              timeout=300)
    assert "succeeded" in r.stdout
    row = models(d)["sorter:latest"]
    assert row["kind"] == "classifier" and row["base"] == "base:latest"
    assert "labels:        early, late" in d.cli("show", "sorter").stdout


def test_i11_cli_refusals_at_submit_queue_nothing(d, qa, labelled, tmp_path):
    before = all_jobs(d)
    r = d.cli("finetune", "base", "x", "--data", str(qa), "--labels", "a,b", check=False)
    assert r.returncode == 64 and "--method classify" in r.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a=", "completion": "a"}])
    with open(bad, "a") as f:
        f.write('{"prompt": broken\n')
    r = d.cli("finetune", "base", "x", "--data", str(bad), *QUICK, check=False)
    assert r.returncode == 65 and "line 2" in r.stderr, r.stderr
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}] * 4)
    r = d.cli("finetune", "base", "x", "--data", str(chat), *QUICK, check=False)
    assert r.returncode == 65 and "template" in r.stderr, r.stderr
    r = d.cli("finetune", "base", "x", "--data", str(labelled), "--method", "classify",
              "--labels", "early,middle,late", *QUICK, check=False)
    assert r.returncode == 65 and "middle" in r.stderr, r.stderr
    assert all_jobs(d) == before
    assert "x:latest" not in models(d)


def test_i11_cli_lora_targets_the_model_lacks_refused_at_submit(d, qa):
    before = {j["job_id"] for j in all_jobs(d)}
    r = d.cli("finetune", "base", "y", "--data", str(qa), "--targets", "q_proj,foo_proj", *QUICK, check=False)
    queued = [j["job_id"] for j in all_jobs(d) if j["job_id"] not in before]
    for j in queued:                              # (a daemon that queued it anyway: stop it)
        d.cli("cancel", str(j), check=False)
    assert r.returncode == 65 and "foo_proj" in r.stderr, r.stderr
    assert not queued


def test_i11_cli_eval_ctrl_c_cancels_the_job(d, tmp_path):
    many = write_jsonl(tmp_path / "many.jsonl",
                       [{"prompt": f"{w}{i}=", "completion": w * 4} for i in range(400) for w in WORDS[:10]])
    p = subprocess.Popen([sys.executable, "-m", "llmctl.cli", "eval", "base", "--data", str(many),
                          "--eval-samples", "4000", "--device", "cpu"],
                         env=d.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    job = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job is None:       # wait until its job runs
            running = [r for r in all_jobs(d) if r["kind"] == "eval" and r["state"] == "running"]
            job = running[0]["job_id"] if running else None
            if job is None:
                assert p.poll() is None, p.communicate()
                time.sleep(0.3)
        assert job is not None, "the eval job never ran"
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = {r["job_id"]: r for r in all_jobs(d)}[job]["state"]
        if state not in ("running", "queued"):
            break
        time.sleep(0.3)
    assert state == "cancelled"


def test_i11_cli_exported_lora_finetune_runs_locally_and_imports_back(d, qa, tmp_path):
    dest = tmp_path / "job"
    out = d.cli("finetune", "base", "exported", "--data", str(qa), "--rank", "4", "--max-steps", "4",
                "--eval-every", "2", *QUICK, "--export", "torchrun", str(dest)).stdout
    assert "--base base:latest" in out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**d.env, "RDZV_ENDPOINT": f"localhost:{port}",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + d.env.get("PATH", "")}
    p = subprocess.Popen(["bash", str(dest / "run.sh")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=300)
    finally:                                   # torchrun and its ranks: the whole group
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, log[-4000:]
    assert (dest / "output" / "adapter_config.json").exists()
    d.cli("import", str(dest / "output"), "exported", "--base", "base", timeout=300)
    assert models(d)["exported:latest"]["base"] == "base:latest"
