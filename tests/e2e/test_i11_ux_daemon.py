"""Issue 11 user-flow review through the command line and a real daemon: a LoRA fine-tune's
validation figures on --wait, jobs show and show; a side-by-side eval kept in the job table;
unload of a base naming its adapter; rm of a base with adapters (exit 65), then --force saying
which weights a finished job keeps; create with a vocabulary too small for its text (exit 65)."""
from __future__ import annotations

import json
import random
import re

import pytest

from conftest import SHAKESPEARE, TINY, Daemon

pytest.importorskip("llmosd.train.finetune")

WORDS = sorted({"".join(random.Random(i).choice("abcdefgh") for _ in range(3)) for i in range(40)})
QUICK = ["--batch-size", "4", "--block-size", "16", "--device", "cpu", "--seed", "1", "--warmup", "0",
         "--eval-samples", "2"]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    dm = Daemon(tmp_path_factory.mktemp("i11ux"))
    dm.outlives_test = True
    try:
        dm.start()
        dm.cli("create", "base", *TINY, "--context", "64", "--vocab-from", str(SHAKESPEARE), "--seed", "1")
        yield dm
    finally:
        dm.stop()


def test_i11_ux_finetune_metrics_eval_side_by_side_unload_rm(d, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": w + "=", "completion": w[::-1]}) + "\n" for w in WORDS))
    # 1: --wait's lines (a log, not a terminal) and its last line carry the validation figures
    r = d.cli("finetune", "base", "qa", "--data", str(qa), "--rank", "2", "--max-steps", "2",
              "--eval-every", "2", *QUICK, "--wait", timeout=300)
    assert re.search(r"val \d\.\d{4}  ppl [\d.]+ em [\d.]+ chrF [\d.]+", r.stderr), r.stderr
    assert re.search(r"succeeded: qa:latest: step 2/2, .*, ppl [\d.]+, em [\d.]+, chrF [\d.]+", r.stdout)
    job = int(r.stdout.split()[0])
    assert re.search(r"validation: +step 2: loss [\d.]+, ppl", d.cli("jobs", "show", str(job)).stdout)
    assert "em " in d.cli("logs", str(job)).stdout
    show = d.cli("show", "qa").stdout
    assert re.search(r"architecture: +adapter of base:latest: [\d.]+K? parameters \([\d.]+ [KM]?B\); "
                     r"base llama [\d.]+[KM]\n", show), show
    assert re.search(r"fine-tuned: .*ppl [\d.]+, em [\d.]+, chrF", show)

    # 4, 5: two models side by side, one column each; the evals' results stay in the job table
    r = d.cli("eval", "base", "qa", "--data", str(qa), "--metric", "loss", "--device", "cpu", timeout=300)
    head, loss = r.stdout.splitlines()[:2]
    assert re.split(r"\s+", head) == ["METRIC", "base", "qa"] and len(re.split(r"\s+", loss)) == 3
    rows = [j for j in json.loads(d.cli("jobs", "--all", "--json").stdout) if j["kind"] == "eval"]
    assert len(rows) == 2 and all(j["loss"] is not None and j["metrics"]["examples"] == len(WORDS) for j in rows)
    assert "result:" in d.cli("jobs", "show", str(rows[0]["job_id"])).stdout

    # 6: unloading the base names the adapter that went with it
    d.cli("load", "qa", timeout=300)
    assert "adapters attached to it: qa:latest" in d.cli("unload", "base").stdout

    # 2, 3: rm of the base is invalid input (65); --force says the finished job keeps the weights
    r = d.cli("rm", "base", check=False)
    assert r.returncode == 65 and "qa:latest" in r.stderr and "rm --force base" in r.stderr
    out = d.cli("rm", "--force", "base").stdout
    assert f"kept for job {job}" in out and f"llmctl jobs rm {job} frees them" in out


def test_i11_ux_7_create_with_a_vocab_too_small_for_the_text_is_exit_65(d, tmp_path):
    text = tmp_path / "wide.txt"
    text.write_text("".join(chr(0x4e00 + i) for i in range(60)) + "\nsome plain words\n")
    r = d.cli("create", "wide", "--layers", "1", "--dim", "16", "--heads", "2", "--vocab-from", str(text),
              "--vocab-size", "300", check=False, timeout=120)
    assert r.returncode == 65, r.stderr
    assert re.search(r"--vocab-size must be at least 3\d\d for this text", r.stderr)
    assert "INTERNAL" not in r.stderr
