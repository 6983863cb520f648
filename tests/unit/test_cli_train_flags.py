"""Issue 10, client side: train / jobs / logs / cancel / pause / resume with a fake client, the
spec flags and files, client-side input checks, --export scripts, --plot, and Client.train's
uploads (a fake ``_call``: no daemon)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from llmctl import Client
from llmctl import format as fmt
from llmctl.cli import main
from llmctl.cli.jobs import Follow, exit_status
from llmctl.cli.table import job_cells
from llmctl.errors import InvalidArgument
from llmctl.jobs import JobLog
from llmctl.trainspec import merge_spec

ROW = {"job_id": 7, "kind": "train", "model": "tiny-char:latest", "state": "queued", "reason": None,
       "step": None, "max_steps": 30, "loss": None, "val_loss": None, "tokens_per_s": None,
       "eta_s": None, "device": "cpu", "owner": 1000, "priority": 0, "created": 1.0e9,
       "started": None, "finished": None, "checkpoint_step": None, "nproc": 1, "pid": None}


def metrics(step, loss, val=None):
    m = {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 12345.0, "eta_s": 3.0 * (30 - step),
         "time": 1.0e9 + step}
    if val is not None:
        m["val_loss"] = val
    return m


def job_stream(final_state="succeeded", reason=None, interrupt=False):
    """The chunks of a followed training job of 30 steps, then its end body."""
    yield {"row": {**ROW, "state": "running", "started": 1.0e9}}
    yield {"line": "tokenizer: char, 65 pieces"}
    for step in range(1, 31):
        if interrupt and step == 5:
            raise KeyboardInterrupt
        yield {"metrics": metrics(step, 4.2 - 0.05 * step, 4.25 - 0.05 * step if step % 10 == 0 else None)}
    final = {**ROW, "state": final_state, "reason": reason, "step": 30, "loss": 2.7, "val_loss": 2.75}
    yield {"row": final}
    return {"job": final}


class FakeClient:
    """Records calls; answers like a daemon would (see train_spec.md)."""

    def __init__(self, final_state="succeeded", reason=None, interrupt=False, refuse=None):
        self.calls = []
        self.final_state, self.reason, self.interrupt, self.refuse = final_state, reason, interrupt, refuse

    def train(self, name, data_paths, spec, priority=0, force=False, progress=None):
        self.calls.append(("train", name, list(data_paths), dict(spec), priority))
        if self.refuse:
            raise self.refuse
        return {**ROW, "model": name}

    def jobs(self, all=False):
        self.calls.append(("jobs", all))
        done = {**ROW, "job_id": 6, "state": "failed", "reason": "worker killed by SIGKILL", "step": 12,
                "loss": 3.1}
        return [done, {**ROW, "state": "running", "step": 12, "loss": 3.0}] if all else [ROW]

    def job(self, job_id):
        self.calls.append(("job", job_id))
        return {"job": {**ROW, "job_id": job_id, "state": "succeeded", "step": 30},
                "spec": {"tokenizer": "char", "layers": 2, "dim": 64, "heads": 4, "max_steps": 30},
                "data": {"s.txt": "sha256:" + "ab" * 32}}

    def job_rm(self, job_id):
        self.calls.append(("job_rm", job_id))
        return {"removed": job_id}

    def job_cancel(self, job_id):
        self.calls.append(("job_cancel", job_id))
        return {**ROW, "job_id": job_id, "state": "cancelled"}

    def job_pause(self, job_id):
        self.calls.append(("job_pause", job_id))
        return {**ROW, "job_id": job_id, "state": "pausing"}

    def job_resume(self, job_id):
        self.calls.append(("job_resume", job_id))
        return {**ROW, "job_id": job_id, "state": "queued"}

    def job_logs(self, job_id, follow=False):
        self.calls.append(("job_logs", job_id, follow))
        return JobLog(job_id, job_stream(self.final_state, self.reason, self.interrupt))


def run(client, *args):
    return main(list(args), obj={"client": client})


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    return p


# -- train: flags, spec files, output ---------------------------------------------------------
def test_i10_train_prints_the_job_id_and_sends_only_given_flags(data, capsys):
    c = FakeClient()
    assert run(c, "train", "tiny-char", "--data", str(data), "--tokenizer", "char", "--max-steps", "30",
               "--lr", "1e-3", "--priority", "2") == 0
    out, err = capsys.readouterr()
    assert out == "7\n" and "llmctl logs -f 7" in err
    _, name, paths, spec, prio = c.calls[0]
    assert (name, paths, prio) == ("tiny-char", [str(data)], 2)
    assert spec == {"tokenizer": "char", "max_steps": 30, "lr": 1e-3}     # defaults are the daemon's


def test_i10_train_spec_file_toml_and_json_flags_override(data, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('tokenizer = "char"\nmax_steps = 100\nlr = 1\ndropout = 0.1\n')
    c = FakeClient()
    assert run(c, "train", "m", "--data", str(data), "--spec", str(toml), "--max-steps", "30") == 0
    assert c.calls[0][3] == {"tokenizer": "char", "max_steps": 30, "lr": 1.0, "dropout": 0.1}
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"layers": 2, "dim": 64.0, "seed": 3}))
    assert run(c, "train", "m", "--data", str(data), "--spec", str(js), "--seed", "4") == 0
    assert c.calls[1][3] == {"layers": 2, "dim": 64, "seed": 4}
    assert merge_spec({"lr": 1e-3}, {"lr": None, "layers": 2}) == {"lr": 1e-3, "layers": 2}


def test_i10_train_several_data_files_after_one_flag(data, tmp_path):
    other = tmp_path / "b.jsonl"
    other.write_text('{"text": "hello"}\n')
    c = FakeClient()
    assert run(c, "train", "m", "--data", str(data), str(other), "--data", str(data)) == 0
    assert c.calls[0][2] == [str(data), str(other)]          # the same file counts once


def test_i10_train_json_prints_the_row_with_job_id(data, capsys):
    assert run(FakeClient(), "train", "m", "--data", str(data), "--json") == 0
    row = json.loads(capsys.readouterr().out)
    assert row["job_id"] == 7 and row["state"] == "queued" and row["model"] == "m"


# -- client-side checks: nothing sent on bad input --------------------------------------------
def test_i10_missing_or_unreadable_data_file_exits_66_before_sending(tmp_path, data, capsys):
    c = FakeClient()
    assert run(c, "train", "m", "--data", str(data), "--data", str(tmp_path / "nope.txt")) == 66
    assert "nope.txt" in capsys.readouterr().err and c.calls == []
    assert run(c, "train", "m", "--data", str(tmp_path)) == 66           # a directory
    assert "is a directory" in capsys.readouterr().err and c.calls == []
    if os.getuid() != 0:                                                 # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("x")
        locked.chmod(0)
        assert run(c, "train", "m", "--data", str(locked)) == 66
        assert c.calls == []
    assert run(c, "train", "m") == 64                                    # no data at all: usage
    assert "--data" in capsys.readouterr().err and c.calls == []


@pytest.mark.parametrize("name,text,needle", [
    ("bad.toml", 'tokenizer = "char"\nmax_steps = = 3\n', "bad.toml line 2"),
    ("bad.json", '{"lr": 0.1,\n "max_steps": }\n', "bad.json line 2"),
    ("typo.toml", 'lr = 0.1\nmax_step = 3\n', "typo.toml line 2: unknown key 'max_step'; did you mean 'max_steps'"),
    ("type.json", '{\n"lr": 0.1,\n"layers": "two"\n}', "type.json line 3: layers must be an integer"),
    ("tok.toml", 'tokenizer = "word"\n', "tokenizer must be one of unigram, bpe, char"),
    ("dt.toml", '\n\ndtype = "float16"\n', "dt.toml line 3: dtype must be one of auto, float32, bfloat16"),
])
def test_i10_bad_spec_file_exits_65_naming_its_line(tmp_path, data, capsys, name, text, needle):
    spec = tmp_path / name
    spec.write_text(text)
    c = FakeClient()
    assert run(c, "train", "m", "--data", str(data), "--spec", str(spec)) == 65
    err = capsys.readouterr().err
    assert needle in err and c.calls == []


def test_i10_missing_spec_file_exits_66(tmp_path, data, capsys):
    assert run(FakeClient(), "train", "m", "--data", str(data), "--spec", str(tmp_path / "x.toml")) == 66


def test_i10_daemon_refusal_is_one_line_exit_65(data, capsys):
    c = FakeClient(refuse=InvalidArgument("data s.txt line 3: not JSON: Expecting value"))
    assert run(c, "train", "m", "--data", str(data)) == 65
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["llmctl: invalid_argument: data s.txt line 3: not JSON: Expecting value"]


# -- train --wait ------------------------------------------------------------------------------
@pytest.mark.parametrize("state,reason,status", [
    ("succeeded", None, 0), ("cancelled", None, 130),
    ("failed", "invalid_argument: s.txt has too little text for one block", 65),
    ("failed", "worker killed by signal 9 (SIGKILL)", 70),
])
def test_i10_train_wait_exits_with_the_job_status(data, capsys, state, reason, status):
    c = FakeClient(final_state=state, reason=reason)
    assert run(c, "train", "m", "--data", str(data), "--wait") == status
    assert ("job_logs", 7, True) in c.calls
    out, err = capsys.readouterr()
    if status == 0:
        assert "job 7 succeeded" in out
    else:
        assert f"job 7 {state}" in err and (reason or "") in err
    assert "\r" not in err                               # a log gets whole lines
    assert exit_status({"state": "failed", "code": 4}) == 65


def test_i10_train_wait_in_a_log_prints_plain_progress_lines(data, capsys):
    assert run(FakeClient(), "train", "m", "--data", str(data), "--wait") == 0
    err = capsys.readouterr().err.splitlines()
    progress = [l for l in err if "step " in l]
    assert "tokenizer: char, 65 pieces" in err
    assert 3 <= len(progress) <= 16                     # tenths and validations, not every step
    assert any("step 30/30" in l and "val 2.7500" in l and "12.3k tok/s" in l for l in progress)
    assert any("ETA 1m12s" in l for l in progress)      # step 6: 72 s left


def test_i10_train_wait_live_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty = Tty()
    f = Follow(as_json=False, stream=tty)
    f.max_steps = 30
    for chunk in list(job_stream())[:-1]:
        f.chunk(7, chunk)
    f.line.done()
    text = tty.getvalue()
    assert "\r\x1b[K" in text and "job 7 running  step 12/30  loss 3.6000" in text
    assert "val 2.7500" in text and "ETA" in text and "tok/s" in text


def test_i10_train_wait_json_one_line_per_metrics_report(data, capsys):
    assert run(FakeClient(), "train", "m", "--data", str(data), "--wait", "--json") == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert lines[0]["job_id"] == 7 and lines[0]["state"] == "queued"
    reports = lines[1:-1]
    assert len(reports) == 30
    assert all({"step", "loss", "tokens_per_s", "eta_s"} <= set(r) for r in reports)
    assert [r["val_loss"] for r in reports if "val_loss" in r] == pytest.approx([3.75, 3.25, 2.75])
    assert lines[-1]["state"] == "succeeded" and lines[-1]["job_id"] == 7


def test_i10_ctrl_c_under_wait_detaches_and_does_not_cancel(data, capsys):
    c = FakeClient(interrupt=True)
    assert run(c, "train", "m", "--data", str(data), "--wait") == 130
    err = capsys.readouterr().err
    assert "detached; the job goes on: llmctl logs -f 7" in err
    assert "cancelled" not in err and not any(call[0] == "job_cancel" for call in c.calls)


# -- jobs, logs, control -----------------------------------------------------------------------
def test_i10_jobs_lists_like_ps(capsys):
    c = FakeClient()
    assert run(c, "jobs") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "KIND", "MODEL", "STATE", "STEP", "LOSS", "DEVICE", "OWNER", "AGE"]
    assert out[1].split()[:4] == ["7", "train", "tiny-char:latest", "queued"]
    assert run(c, "jobs", "--all") == 0
    out = capsys.readouterr().out
    assert "failed: worker killed by SIGKILL" in out and "12/30" in out and "3.0000" in out
    assert c.calls == [("jobs", False), ("jobs", True)]
    assert run(c, "jobs", "--all", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"job_id", "state", "step", "max_steps", "model"} <= set(rows[0])


def test_i10_jobs_rm_and_show(capsys):
    c = FakeClient()
    assert run(c, "jobs", "rm", "3", "4") == 0
    assert capsys.readouterr().out == "removed job 3\nremoved job 4\n"
    assert run(c, "jobs", "show", "3") == 0
    out = capsys.readouterr().out
    assert "tokenizer=char" in out and "s.txt (abababababab)" in out
    assert run(c, "jobs", "rm", "x") == 64                   # not a job id: usage


def test_i10_cancel_pause_resume(capsys):
    c = FakeClient()
    assert run(c, "cancel", "3") == 0 and run(c, "pause", "4") == 0 and run(c, "resume", "4", "5") == 0
    assert capsys.readouterr().out == "job 3 cancelled\njob 4 pausing\njob 4 queued\njob 5 queued\n"
    assert [x for x in c.calls] == [("job_cancel", 3), ("job_pause", 4), ("job_resume", 4), ("job_resume", 5)]


def test_i10_logs_text_and_json(capsys):
    c = FakeClient()
    assert run(c, "logs", "7") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "-- job 7 running" and out[1] == "tokenizer: char, 65 pieces"
    assert out[2] == "step 1/30  loss 4.1500  lr 1.00e-03  12.3k tok/s  ETA 1m27s"
    assert out[-1] == "-- job 7 succeeded" and out.count("-- job 7 succeeded") == 1
    assert c.calls == [("job", 7), ("job_logs", 7, False)]
    assert run(c, "logs", "-f", "7", "--json") == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert c.calls[-1] == ("job_logs", 7, True)
    assert sum("metrics" in l for l in lines) == 30 and lines[-1]["job"]["state"] == "succeeded"


def test_i10_logs_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "loss.png"
    assert run(FakeClient(), "logs", "7", "--plot", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "30 train and 3 validation points; best validation 2.7500 at step 30" in capsys.readouterr().out
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".plot-")]     # no temp file left


def test_i10_logs_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)          # import fails
    assert run(FakeClient(), "logs", "7", "--plot", str(tmp_path / "l.png")) == 69
    assert "pip install 'llmosd[plot]'" in capsys.readouterr().err


def test_i10_llmctl_imports_neither_torch_nor_matplotlib():
    code = "import sys, llmctl.cli, llmctl.plot; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "False"], r.stderr


# -- --export: acceptance 5 ---------------------------------------------------------------------
def test_i10_5_export_torchrun_writes_a_runnable_job(tmp_path, data, capsys):
    dest = tmp_path / "job"
    c = FakeClient()
    assert run(c, "train", "tiny", "--data", str(data), "--tokenizer", "char", "--nproc", "2",
               "--export", "torchrun", str(dest)) == 0
    assert c.calls == []                                         # no daemon involved
    assert sorted(os.listdir(dest)) == ["README", "data", "run.sh", "spec.json"]
    assert (dest / "data" / "s.txt").read_bytes() == data.read_bytes()      # as the daemon's run dirs
    spec = json.loads((dest / "spec.json").read_text())
    assert spec["tokenizer"] == "char" and spec["nproc"] == 2 and spec["data"]["s.txt"].startswith("sha256:")
    script = (dest / "run.sh").read_text()
    assert subprocess.run(["bash", "-n", str(dest / "run.sh")]).returncode == 0
    assert os.access(dest / "run.sh", os.X_OK)
    assert "torchrun --nnodes 1 --node-rank 0 --nproc-per-node 2" in script
    assert "--rdzv-backend c10d" in script and "-m llmosd.train.entry" in script
    assert f"llmctl import {dest}/output tiny" in (dest / "README").read_text()


def test_i10_5_export_torchrun_one_command_per_node(tmp_path, data):
    dest = tmp_path / "job"
    assert run(FakeClient(), "train", "t", "--data", str(data), "--export", "torchrun", str(dest),
               "--nnodes", "3", "--rdzv-endpoint", "head:29400") == 0
    script = (dest / "run.sh").read_text()
    assert [f"--node-rank {k}" in script for k in range(3)] == [True] * 3 and script.count("exec torchrun") == 3
    assert "head:29400" in script
    r = subprocess.run(["bash", str(dest / "run.sh")], env={**os.environ, "NODE_RANK": "7"},
                       capture_output=True, text=True)
    assert r.returncode == 64 and "NODE_RANK must be 0..2" in r.stderr


def test_i10_5_export_slurm_sbatch_bash_n_srun_torchrun_c10d(tmp_path, data):
    dest = tmp_path / "job dir"                                  # a space: quoted in the script
    assert run(FakeClient(), "train", "t", "--data", str(data), "--nproc", "4",
               "--export", "slurm", str(dest), "--nnodes", "2", "--json") == 0
    script = (dest / "job.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(dest / "job.sbatch")]).returncode == 0
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "srun torchrun --nnodes \"$SLURM_NNODES\" --nproc-per-node 4" in script
    assert "--rdzv-backend c10d --rdzv-endpoint \"$head:29500\"" in script
    assert "-m llmosd.train.entry \"$RUN_DIR\"" in script and f"'{dest}'" in script


def test_i10_5_export_refuses_a_directory_that_is_not_empty(tmp_path, data, capsys):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "x").write_text("")
    assert run(FakeClient(), "train", "t", "--data", str(data), "--export", "slurm", str(tmp_path / "job")) == 73
    assert "not empty" in capsys.readouterr().err
    assert run(FakeClient(), "train", "t", "--data", str(data), "--export", "slurm", str(tmp_path / "j2"),
               "--wait") == 64


# -- Client.train: uploads, content-addressed ----------------------------------------------------
class RecordingClient(Client):
    """A Client whose wire is a dict: the store has ``have`` digests; records every call."""

    def __init__(self, have=()):
        super().__init__("ipc:///nonexistent/llmosd.sock")
        self.sent, self.have = [], set(have)

    def _call(self, type_, body=None, timeout=None):
        self.sent.append((type_, dict(body or {})))
        if type_ == "upload":
            return {"have": body["digest"] in self.have}
        if type_ == "upload_chunk":
            self.have.add(body["digest"])
            return {"complete": True}
        if type_ == "train":
            return {"job": {**ROW, "model": body["name"]}}
        raise AssertionError(type_)


def test_i10_client_train_uploads_each_file_once(tmp_path, data):
    other = tmp_path / "b.txt"
    other.write_text("more text\n")
    c = RecordingClient()
    row = c.train("m", [str(data), str(other), str(data)], {"max_steps": 3}, priority=1)
    assert row["job_id"] == 7
    kinds = [t for t, _ in c.sent]
    assert kinds == ["upload", "upload_chunk", "upload", "upload_chunk", "train"]
    train = c.sent[-1][1]
    assert set(train["data"]) == {"s.txt", "b.txt"} and train["priority"] == 1
    assert train["spec"] == {"max_steps": 3} and "force" not in train
    c.sent.clear()
    c.train("m", [str(data)], {})                     # already in the store: not sent again
    assert [t for t, _ in c.sent] == ["upload", "train"]


def test_i10_client_train_checks_every_file_before_sending(tmp_path, data):
    c = RecordingClient()
    with pytest.raises(FileNotFoundError):
        c.train("m", [str(data), str(tmp_path / "missing.txt")], {})
    with pytest.raises(InvalidArgument, match="unknown key 'epochs'"):
        c.train("m", [str(data)], {"epochs": 3})
    twin = tmp_path / "d"
    twin.mkdir()
    (twin / "s.txt").write_text("other")
    with pytest.raises(InvalidArgument, match="two data files are named s.txt"):
        c.train("m", [str(data), str(twin / "s.txt")], {})
    assert c.sent == []


# -- formatting --------------------------------------------------------------------------------
def test_i10_formats():
    assert [fmt.duration(s) for s in (None, 5, 72, 3725, 90000)] == ["-", "5s", "1m12s", "1h02m", "1d01h"]
    assert [fmt.rate(r) for r in (None, 950, 12345, 2.5e6)] == ["-", "950 tok/s", "12.3k tok/s", "2.5M tok/s"]
    assert fmt.train_progress(metrics(12, 3.6, 3.7), 30) == "step 12/30  loss 3.6000  val 3.7000  12.3k tok/s  ETA 54s"
    # ps shows running jobs with the new rows (and still the rows of protocol 1.4)
    assert job_cells({**ROW, "state": "running", "step": 3, "loss": 4.0, "pid": 9}) == \
        [7, "train", "tiny-char:latest", "running", "step 3/30, loss 4.0000", 9]
    assert job_cells({"id": 2, "kind": "create", "target": "t", "state": "running",
                      "progress": {"message": "training tokenizer"}, "pid": 5}) == \
        [2, "create", "t", "running", "training tokenizer", 5]
