"""Issue 11, client side: finetune / eval / merge / import --base / rm --force / ls / export of
an adapter, with fake clients (no daemon): flags and spec files become the spec, bad
combinations are refused before anything is sent, and the library's uploads and Ctrl-C."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llmctl import Client
from llmctl.cli import cli, main
from llmctl.errors import InvalidArgument
from llmctl.export import export_model
from llmctl.jobs import JobLog
from llmctl.trainspec import FINETUNE_KEYS, check_spec, finetune_conflict
from llmctl.upload import import_source

ROOT = Path(__file__).resolve().parents[2]
ROW = {"job_id": 9, "kind": "finetune", "model": "qa:latest", "state": "queued", "reason": None,
       "step": None, "max_steps": 20, "loss": None, "val_loss": None, "tokens_per_s": None,
       "eta_s": None, "device": "cpu", "owner": 1000, "priority": 0, "created": 1.0e9,
       "started": None, "finished": None, "checkpoint_step": None, "nproc": 1, "pid": None}
EVAL = {"model": "qa:latest", "examples": 40, "job": 10,
        "metrics": {"loss": 0.5123, "perplexity": 1.669, "exact_match": 0.95, "chrf": 97.25}}
DIGEST = "sha256:" + "cd" * 32
BLOBS = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in (b"{}", b"tokenizer", b"weights")}
CONFIG, TOKENIZER, WEIGHTS = BLOBS


def followed(final="succeeded"):
    yield {"row": {**ROW, "state": "running"}}
    yield {"metrics": {"step": 10, "loss": 1.0, "val_loss": 1.1, "exact_match": 0.5, "lr": 3e-4,
                       "tokens_per_s": 100.0, "eta_s": 1.0}}
    end = {**ROW, "state": final, "step": 20, "loss": 0.4, "val_loss": 0.45}
    yield {"row": end}
    return {"job": end}


class FakeClient:
    """Records every call; answers as a daemon of protocol 1.6 would."""

    def __init__(self, interrupt=False, final="succeeded"):
        self.calls, self.interrupt, self.final = [], interrupt, final

    def finetune(self, base, name, data_paths, spec, val_data=None, priority=0, force=False, progress=None):
        self.calls.append(("finetune", base, name, list(data_paths), dict(spec), val_data, priority, force))
        return {**ROW, "model": name}

    def job_logs(self, job_id, follow=False):
        self.calls.append(("job_logs", job_id, follow))
        return JobLog(job_id, followed(self.final))

    def eval(self, model, data_paths, spec=None, progress=None):
        self.calls.append(("eval", model, list(data_paths), spec))
        if self.interrupt:
            raise KeyboardInterrupt
        progress({"stage": "eval", "message": "40 examples", "done": 40, "total": 40})
        return EVAL

    def merge(self, adapter, name, force=False, progress=None):
        self.calls.append(("merge", adapter, name, force))
        return {"model": name + ":latest", "digest": DIGEST, "parameters": 1234567, "size": 5_000_000, "job": 11}

    def import_path(self, path, name, force=False, dtype=None, base=None, progress=None):
        self.calls.append(("import", path, name, base, dtype))
        return {"model": name + ":latest", "digest": DIGEST, "parameters": 1000, "size": 4000}

    def rm(self, model, force=False):
        self.calls.append(("rm", model, force))
        return {"model": model + ":latest", "digest": DIGEST, "freed_bytes": 2048,
                "removed": ["qa:latest", "sent:latest"] if force else []}

    def ls(self):
        base = {"digest": DIGEST, "size": 10, "parameters": 100, "method": "import", "created": None,
                "instances": []}
        return [{**base, "model": "smol:latest", "kind": "model", "base": None},
                {**base, "model": "qa:latest", "kind": "adapter", "base": "smol:latest", "method": "finetune"},
                {**base, "model": "old:latest"}]                # a row of an older daemon

    def show(self, model):
        self.calls.append(("show", model))
        man = {"config": {"digest": CONFIG}, "weights": {"digest": WEIGHTS},
               "tokenizer": {"digest": TOKENIZER, "type": "hf", "add_bos": False},
               "chat_template": "{{ messages }}"}
        if model.startswith("qa"):
            man = {**man, "kind": "adapter", "base": {"model": "smol:latest"}}
            del man["weights"]
        return {"model": model + ":latest", "digest": DIGEST, "manifest": man}

    def download(self, digest, offset, size=1 << 22):
        data = BLOBS[digest]
        return {"data": data[offset:], "total": len(data)}


def run(client, *args):
    return main(list(args), obj={"client": client})


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"}) + "\n" for i in range(20)))
    return p


# -- finetune: flags and spec files become the spec -----------------------------------------------
def test_i11_finetune_flags_become_the_spec(data, capsys):
    c = FakeClient()
    assert run(c, "finetune", "smol", "qa", "--data", str(data), "--method", "lora", "--rank", "16",
               "--alpha", "32", "--lora-dropout", "0.05", "--targets", "q_proj, v_proj,o_proj",
               "--epochs", "3", "--eval-samples", "8", "--lr", "1e-3", "--seed", "2", "--priority", "3") == 0
    out, err = capsys.readouterr()
    assert out == "9\n" and "fine-tuning smol into qa" in err and "llmctl logs -f 9" in err
    _, base, name, paths, spec, val, prio, force = c.calls[0]
    assert (base, name, paths, val, prio, force) == ("smol", "qa", [str(data)], None, 3, False)
    assert spec == {"method": "lora", "rank": 16, "alpha": 32.0, "lora_dropout": 0.05,
                    "targets": ["q_proj", "v_proj", "o_proj"], "epochs": 3.0, "eval_samples": 8,
                    "lr": 1e-3, "seed": 2}


def test_i11_finetune_classify_labels_val_data_force_and_all_linear(data, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "good", "label": "pos"}\n')
    c = FakeClient()
    assert run(c, "finetune", "smol", "sent", "--data", str(data), "--val-data", str(val), "--method", "classify",
               "--labels", "pos,neg", "--targets", "all-linear", "--force", "--max-steps", "5") == 0
    _, _, _, _, spec, v, _, force = c.calls[0]
    assert spec == {"method": "classify", "labels": ["pos", "neg"], "targets": "all-linear", "max_steps": 5}
    assert v == [str(val)] and force is True
    assert run(c, "finetune", "smol", "sent", "--data", str(data), "--method", "classify", "--head-only") == 0
    assert c.calls[1][4] == {"method": "classify", "head_only": True}


def test_i11_finetune_spec_files_with_the_new_keys(data, tmp_path):
    toml = tmp_path / "ft.toml"
    toml.write_text('method = "classify"\nlabels = ["a", "b", "c"]\nhead_only = true\nepochs = 2\n'
                    'eval_samples = 4\nlr = 1\n')
    c = FakeClient()
    assert run(c, "finetune", "smol", "m", "--data", str(data), "--spec", str(toml), "--epochs", "0.5") == 0
    assert c.calls[0][4] == {"method": "classify", "labels": ["a", "b", "c"], "head_only": True,
                             "epochs": 0.5, "eval_samples": 4, "lr": 1.0}
    js = tmp_path / "ft.json"
    js.write_text(json.dumps({"method": "lora", "targets": "q_proj,k_proj", "rank": 4.0, "alpha": 8}))
    assert run(c, "finetune", "smol", "m", "--data", str(data), "--spec", str(js)) == 0
    assert c.calls[1][4] == {"method": "lora", "targets": ["q_proj", "k_proj"], "rank": 4, "alpha": 8.0}
    assert check_spec({"targets": ["all-linear"], "labels": "x"}, keys=FINETUNE_KEYS) == \
        {"targets": "all-linear", "labels": ["x"]}


@pytest.mark.parametrize("text,needle", [
    ('head_only = "yes"\n', "ft.toml line 1: head_only must be true or false"),
    ('\ntargets = 3\n', "ft.toml line 2: targets must be a list of strings"),
    ('labels = "a,,b"\n', "labels has an empty name"),
    ('method = "qlora"\n', "method must be one of full, lora, classify"),
    ('layers = 4\n', "unknown key 'layers' (fine-tuning keeps the base model's architecture and tokenizer)"),
    ('epoch = 4\n', "unknown key 'epoch'; did you mean 'epochs'"),
])
def test_i11_finetune_bad_spec_file_exits_65_naming_its_line(data, tmp_path, capsys, text, needle):
    spec = tmp_path / "ft.toml"
    spec.write_text(text)
    c = FakeClient()
    assert run(c, "finetune", "smol", "m", "--data", str(data), "--spec", str(spec)) == 65
    assert needle in capsys.readouterr().err and c.calls == []


# -- refusals of bad combinations: usage errors, nothing sent ----------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--labels", "a,b"], "labels (--labels) are for --method classify, not lora"),
    (["--method", "full", "--labels", "a,b"], "not full"),
    (["--head-only"], "head_only (--head-only) is for --method classify"),
    (["--epochs", "2", "--max-steps", "10"], "either epochs (--epochs) or max_steps (--max-steps), not both"),
    (["--method", "full", "--rank", "4"], "--method full trains no LoRA adapter"),
    (["--method", "classify", "--head-only", "--targets", "all-linear"], "classify with --head-only trains no LoRA"),
    (["--layers", "2"], "--layers is not a finetune flag: fine-tuning keeps the base model's architecture"),
    (["--tokenizer", "char"], "--tokenizer is not a finetune flag"),
    (["--vocab-size", "300"], "--vocab-size is not a finetune flag"),
    (["--nnodes", "2"], "--nnodes and --rdzv-endpoint describe an --export'ed job"),
])
def test_i11_finetune_refuses_bad_flag_combinations(data, capsys, args, needle):
    c = FakeClient()
    assert run(c, "finetune", "smol", "m", "--data", str(data), *args) == 64
    assert needle in capsys.readouterr().err and c.calls == []


def test_i11_finetune_refuses_a_conflict_between_spec_file_and_flags(data, tmp_path, capsys):
    spec = tmp_path / "ft.toml"
    spec.write_text("epochs = 3\n")
    c = FakeClient()
    assert run(c, "finetune", "smol", "m", "--data", str(data), "--spec", str(spec), "--max-steps", "9") == 64
    assert "not both" in capsys.readouterr().err and c.calls == []
    assert finetune_conflict({"method": "classify", "labels": ["a"], "rank": 4}) is None


def test_i11_review_finetune_refuses_eval_batches(data, tmp_path, capsys):
    """A fine-tune's validation covers every validation example: --eval-batches is refused (it
    did nothing), as a flag, in a spec file and by the library, before anything is sent."""
    c = FakeClient()
    assert run(c, "finetune", "smol", "m", "--data", str(data), "--eval-batches", "3") == 64
    assert "--eval-batches is not a finetune flag: a fine-tune's validation loss covers every" \
        in capsys.readouterr().err and c.calls == []
    spec = tmp_path / "ft.toml"
    spec.write_text("rank = 4\neval_batches = 3\n")
    assert run(c, "finetune", "smol", "m", "--data", str(data), "--spec", str(spec)) == 65
    err = capsys.readouterr().err
    assert "line 2: unknown key 'eval_batches' (a fine-tune's validation loss" in err and c.calls == []
    assert "eval_batches" not in FINETUNE_KEYS
    with pytest.raises(InvalidArgument, match="eval_batches"):
        Client.finetune(RecordingClient(), "smol", "m", [str(data)], {"eval_batches": 3})
    assert any("--eval-batches" in p.opts for p in cli.commands["train"].params)     # train keeps it


def test_i11_finetune_needs_data_and_readable_files(tmp_path, data, capsys):
    c = FakeClient()
    assert run(c, "finetune", "smol", "m") == 64
    assert "--data" in capsys.readouterr().err
    assert run(c, "finetune", "smol", "m", "--data", str(data), "--val-data", str(tmp_path / "nope.jsonl")) == 66
    assert "nope.jsonl" in capsys.readouterr().err and c.calls == []


@pytest.mark.parametrize("final,status", [("succeeded", 0), ("cancelled", 130)])
def test_i11_finetune_wait_follows_and_exits_with_the_job_status(data, capsys, final, status):
    c = FakeClient(final=final)
    assert run(c, "finetune", "smol", "qa", "--data", str(data), "--wait") == status
    assert ("job_logs", 9, True) in c.calls


def test_i11_finetune_json_prints_the_row(data, capsys):
    assert run(FakeClient(), "finetune", "smol", "qa", "--data", str(data), "--json") == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "finetune"


# -- eval, merge ----------------------------------------------------------------------------------
def test_i11_eval_prints_a_metrics_table_and_the_example_count(data, capsys):
    c = FakeClient()
    assert run(c, "eval", "qa", "--data", str(data), "--metric", "exact_match", "--metric", "chrf",
               "--eval-samples", "40") == 0
    out = capsys.readouterr().out.splitlines()
    assert c.calls[0] == ("eval", "qa", [str(data)], {"metrics": ["exact_match", "chrf"], "eval_samples": 40})
    assert re.split(r"\s+", out[0]) == ["METRIC", "VALUE"]
    assert [re.split(r"\s+", line) for line in out[1:5]] == [
        ["loss", "0.5123"], ["perplexity", "1.6690"], ["exact_match", "0.9500"], ["chrf", "97.2500"]]
    assert out[5] == "40 examples, model qa:latest (job 10)"
    assert run(c, "eval", "qa", "--data", str(data), "--json") == 0
    assert json.loads(capsys.readouterr().out) == EVAL and c.calls[1][3] is None


def test_i11_eval_ctrl_c_exits_130(data, capsys):
    assert run(FakeClient(interrupt=True), "eval", "qa", "--data", str(data)) == 130
    assert run(FakeClient(), "eval", "qa", "--data", str(data), "--metric", "bleu") == 64


def test_i11_merge_prints_the_model_made(capsys):
    c = FakeClient()
    assert run(c, "merge", "qa", "qa-merged", "--force") == 0
    assert c.calls == [("merge", "qa", "qa-merged", True)]
    out = capsys.readouterr().out
    assert out.startswith("merged qa-merged:latest (") and out.rstrip().endswith("from qa")


# -- import --base, rm --force, ls, export of an adapter -----------------------------------------
@pytest.fixture
def peft_dir(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    (d / "README.md").write_text("not sent")
    return d


def test_i11_import_peft_adapter_needs_base(peft_dir, tmp_path, capsys):
    c = FakeClient()
    assert run(c, "import", str(peft_dir), "qa") == 64
    assert "--base MODEL" in capsys.readouterr().err and c.calls == []
    assert run(c, "import", str(peft_dir), "qa", "--base", "smol") == 0
    assert c.calls == [("import", str(peft_dir), "qa", "smol", None)]
    assert "an adapter of smol" in capsys.readouterr().out
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert run(c, "import", str(hf), "m", "--base", "smol") == 64
    assert "--base MODEL is for a PEFT adapter directory" in capsys.readouterr().err
    fmt_, files = import_source(str(peft_dir), "smol")
    assert fmt_ == "peft" and sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(InvalidArgument, match="--base MODEL"):
        import_source(str(peft_dir))
    os.unlink(peft_dir / "adapter_model.safetensors")
    with pytest.raises(InvalidArgument, match="no adapter_model.safetensors"):
        import_source(str(peft_dir), "smol")


def test_i11_rm_force_says_what_it_removed_too(capsys):
    c = FakeClient()
    assert run(c, "rm", "--force", "smol") == 0
    assert c.calls == [("rm", "smol", True)]
    out = capsys.readouterr().out
    assert "deleted smol:latest" in out and "also removed what was made on it: qa:latest, sent:latest" in out
    assert run(c, "rm", "smol") == 0 and "also removed" not in capsys.readouterr().out


def test_i11_ls_shows_kind_and_base(capsys):
    assert run(FakeClient(), "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert "KIND/BASE" in lines[0]
    assert "adapter of smol:latest" in lines[2] and re.search(r"\bmodel\b", lines[1])
    assert re.search(r"\bmodel\b", lines[3])                   # an older daemon's row: a model


def test_i11_export_of_an_adapter_writes_the_peft_files(tmp_path):
    blob = b"lora tensors"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()

    class C:
        def hf_files(self, model):
            cfg = json.dumps({"base_model_name_or_path": "smol", "peft_type": "LORA"}).encode()
            return {"model": "qa:latest", "digest": DIGEST, "files": [
                {"name": "adapter_config.json", "data": cfg},
                {"name": "adapter_model.safetensors", "digest": digest, "size": len(blob)}]}

        def download(self, d, offset, size=1 << 22):
            return {"data": blob[offset:], "total": len(blob)}

    r = export_model(C(), "qa", str(tmp_path / "out"))
    assert r["format"] == "peft" and r["base"] == "smol"
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == blob


# -- finetune --export: the base's files come from the daemon -----------------------------------
def test_i11_finetune_export_torchrun_writes_parent_and_spec(data, tmp_path, capsys):
    val = tmp_path / "v.jsonl"
    val.write_text('{"prompt": "Q", "completion": "A"}\n')
    dest = tmp_path / "job"
    c = FakeClient()
    assert run(c, "finetune", "smol", "qa", "--data", str(data), "--val-data", str(val), "--rank", "4",
               "--export", "torchrun", str(dest)) == 0
    assert not any(call[0] == "finetune" for call in c.calls)
    assert sorted(os.listdir(dest / "parent")) == ["config.json", "meta.json", "model.safetensors", "tokenizer.bin"]
    meta = json.loads((dest / "parent" / "meta.json").read_text())
    assert meta == {"name": "smol:latest", "digest": DIGEST, "tokenizer_type": "hf", "add_bos": False,
                    "weights_digest": WEIGHTS, "chat_template": "{{ messages }}", "defaults": {}}
    assert (dest / "parent" / "model.safetensors").read_bytes() == b"weights"
    spec = json.loads((dest / "spec.json").read_text())
    assert spec["method"] == "lora" and spec["rank"] == 4 and list(spec["val_data"]) == ["v.jsonl"]
    assert os.listdir(dest / "data") == ["qa.jsonl"] and os.listdir(dest / "val_data") == ["v.jsonl"]
    assert subprocess.run(["bash", "-n", str(dest / "run.sh")]).returncode == 0
    assert f"llmctl import {dest}/output qa --base smol:latest" in (dest / "README").read_text()
    assert "--base smol:latest" in capsys.readouterr().out


def test_i11_finetune_export_refusals(data, tmp_path, capsys):
    c = FakeClient()
    assert run(c, "finetune", "smol", "s", "--data", str(data), "--method", "classify",
               "--export", "slurm", str(tmp_path / "a")) == 64
    assert "not supported yet" in capsys.readouterr().err
    assert run(c, "finetune", "qa", "s", "--data", str(data), "--export", "slurm", str(tmp_path / "b")) == 65
    assert "merge it first" in capsys.readouterr().err


# -- the library: uploads and Ctrl-C ---------------------------------------------------------------
class RecordingClient(Client):
    """A Client whose wire is a dict; records every call."""

    def __init__(self):
        super().__init__("ipc:///nonexistent/llmosd.sock")
        self.sent, self.have, self.cancelled = [], set(), []

    def _call(self, type_, body=None, timeout=None):
        self.sent.append((type_, dict(body or {})))
        if type_ == "upload":
            return {"have": body["digest"] in self.have}
        if type_ == "upload_chunk":
            self.have.add(body["digest"])
            return {"complete": True}
        if type_ in ("finetune", "rm"):
            return {"job": ROW} if type_ == "finetune" else {"model": body["model"], "removed": []}
        raise AssertionError(type_)

    def _start_stream(self, type_, body):
        self.sent.append((type_, dict(body)))

        def stream():
            yield {"stage": "eval", "message": "1/2", "done": 1, "total": 2}
            raise KeyboardInterrupt
        return 5, stream()

    def _send_cancel(self, rid):
        self.cancelled.append(rid)


def test_i11_client_finetune_uploads_data_and_val_data(data, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "Q", "completion": "A"}\n')
    c = RecordingClient()
    assert c.finetune("smol", "qa", [str(data)], {"rank": 4}, val_data=[str(val)], force=True) == ROW
    body = c.sent[-1][1]
    assert c.sent[-1][0] == "finetune" and body["base"] == "smol" and body["name"] == "qa"
    assert set(body["data"]) == {"qa.jsonl"} and set(body["val_data"]) == {"val.jsonl"}
    assert body["spec"] == {"rank": 4} and body["force"] is True
    with pytest.raises(InvalidArgument, match="not both"):
        c.finetune("smol", "qa", [str(data)], {"epochs": 1, "max_steps": 3})
    c.rm("smol", force=True)
    assert c.sent[-1] == ("rm", {"model": "smol", "force": True})


def test_i11_client_eval_ctrl_c_cancels_the_job(data):
    c = RecordingClient()
    seen = []
    with pytest.raises(KeyboardInterrupt):
        c.eval("qa", [str(data)], {"metrics": "loss,chrf"}, progress=seen.append)
    assert c.cancelled == [5] and seen and c.sent[-1][0] == "eval"
    assert c.sent[-1][1]["spec"] == {"metrics": ["loss", "chrf"]}


# -- the manual page: every new command and flag ---------------------------------------------------
def test_i11_man_page_names_every_finetune_command_and_flag():
    page = (ROOT / "man" / "llmctl.1").read_text()
    for name in ("finetune", "eval", "merge"):
        cmd = cli.commands[name]
        assert re.search(rf"^\.B {name}\b", page, re.M), name
        for p in cmd.params:
            for opt in p.opts:
                if opt.startswith("--") and not getattr(p, "hidden", False) and opt != "--help":
                    assert "\\-\\-" + opt[2:].replace("-", "\\-") in page, (name, opt)
    for flag in ("\\-\\-base", "\\-\\-force"):
        assert flag in page


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is not installed")
def test_i11_man_page_lint_clean():
    r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(ROOT / "man" / "llmctl.1")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout
