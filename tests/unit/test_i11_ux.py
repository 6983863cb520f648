"""Issue 11 user-flow review, without a daemon: validation metrics on every view of a
fine-tune, lasting refusals that are not "busy", rm saying which weights jobs keep, side-by-side
eval, eval results in job records, unload naming its adapters, create's vocabulary size, and
show of an adapter."""
from __future__ import annotations

import json
import re

import pytest

from llmctl import errors
from llmctl import format as fmt
from llmctl.cli import main
from llmctl.cli.finetune import side_by_side
from llmctl.cli.store import architecture, trained
from llmctl.jobs import AnyOf, JobLog, JobsMixin
from llmosd.jobs.queue import JobState
from llmosd.ops.jobctl import job_row
from test_ops_finetune import call, data_blob, env, put_adapter, put_model  # noqa: F401 - env: a fixture
from test_ops_finetune_review import real, start  # noqa: F401 - real: a fixture

FT_REPORT = {"step": 40, "loss": 0.41, "val_loss": 0.52, "val_ppl": 1.68, "exact_match": 0.75,
             "chrf": 91.2, "lr": 1e-4, "tokens_per_s": 100.0}
CLS_REPORT = {"step": 10, "loss": 0.3, "val_loss": 0.35, "val_ppl": 1.42, "accuracy": 0.9, "f1": 0.8889}
ROW = {"job_id": 9, "kind": "finetune", "model": "qa:latest", "state": "succeeded", "reason": None,
       "step": 40, "max_steps": 40, "loss": 0.41, "val_loss": 0.52, "tokens_per_s": None, "eta_s": None,
       "device": "cpu", "owner": 1000, "priority": 0, "created": 1.0e9, "started": None,
       "finished": None, "checkpoint_step": 40, "nproc": 1, "pid": None}


class Fake:
    """The client calls the commands under test make, answered from ``replies``."""

    def __init__(self, **replies):
        self.replies, self.calls = replies, []

    def __getattr__(self, name):
        def f(*a, **kw):
            self.calls.append((name, a, kw))
            r = self.replies[name]
            return r(*a, **kw) if callable(r) else r
        return f


def run(client, *args):
    return main(list(args), obj={"client": client})


# -- 1: validation metrics in progress lines, jobs show, show's lineage and the plot ---------
def test_i11_ux_1_progress_lines_show_the_validation_metrics(capsys, tmp_path):
    line = fmt.train_progress(FT_REPORT, 40)
    assert "step 40/40  loss 0.4100  val 0.5200  ppl 1.68 em 0.75 chrF 91.2" in line
    assert "acc 0.900 f1 0.889" in fmt.train_progress(CLS_REPORT, 10)
    assert "ppl" not in fmt.train_progress({"step": 3, "loss": 1.0}, 10)       # a train report as before

    def followed():
        yield {"row": {**ROW, "state": "running"}}
        yield {"metrics": FT_REPORT}
        yield {"row": ROW}
        return {"job": ROW}
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    c = Fake(finetune={**ROW, "state": "queued"}, job_logs=lambda j, follow=False: JobLog(j, followed()))
    assert run(c, "finetune", "smol", "qa", "--data", str(data), "--wait") == 0
    out, err = capsys.readouterr()
    assert "ppl 1.68 em 0.75 chrF 91.2" in err                      # the plain progress line
    assert "job 9 succeeded: qa:latest: step 40/40, loss 0.4100, val 0.5200, ppl 1.68, em 0.75, chrF 91.2" in out

    c = Fake(job={"job": ROW}, job_logs=lambda j, follow=False: JobLog(j, followed()))
    assert run(c, "logs", "9") == 0
    assert "em 0.75 chrF 91.2" in capsys.readouterr().out


def test_i11_ux_1_jobs_show_and_show_lineage_have_the_final_metrics(capsys):
    c = Fake(job={"job": {**ROW, "metrics": FT_REPORT}, "spec": {"method": "lora"}, "data": {}})
    assert run(c, "jobs", "show", "9") == 0
    assert "validation:      step 40: loss 0.5200, ppl 1.68, em 0.75, chrF 91.2" in capsys.readouterr().out
    lin = {"method": "finetune", "job": 9, "final": {"step": 40, "loss": 0.41, "val_loss": 0.52,
           "best_val_loss": 0.5, "metrics": {"loss": 0.52, "perplexity": 1.68, "accuracy": 0.9, "f1": 0.8}}}
    assert trained(lin).endswith("val 0.5200 (best 0.5000), ppl 1.68, acc 0.900, f1 0.800")


def test_i11_ux_1_plot_draws_a_classifier_accuracy_curve_and_keeps_the_legend_off_the_curves(tmp_path,
                                                                                              monkeypatch):
    pytest.importorskip("matplotlib")
    from llmctl import plot
    seen = {}
    monkeypatch.setattr(plot, "_save", lambda fig, path: seen.update(fig=fig))
    reports = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
    reports += [{**CLS_REPORT, "step": 5, "accuracy": 0.7}, CLS_REPORT]
    s = plot.plot_losses(reports, str(tmp_path / "p.png"))
    assert s["scores"] == {"accuracy": 0.9, "macro-F1": 0.8889}
    fig = seen["fig"]
    main_ax, right = fig.axes[0], fig.axes[1]
    assert main_ax.get_ylabel() == "loss (cross entropy per example, nats)"
    assert right.get_ylabel().startswith("validation score") and right.get_ylim()[0] == 0
    assert main_ax.get_legend() is None and len(fig.legends) == 1            # under the plot
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("accuracy (last 0.900)") for t in texts) and any("validation" in t for t in texts)
    gen = plot.scores([{"step": 2, "exact_match": 0.5, "chrf": 80.0}])
    assert gen == {"exact match": [(2, 0.5)], "chrF / 100": [(2, 0.8)]}
    assert plot.loss_label([{"step": 1, "loss": 2.0}]) == "loss (nats per token)"


# -- 2: a base that adapters use is refused as invalid input, not busy -----------------------
def test_i11_ux_2_rm_and_tag_of_a_base_with_adapters_are_invalid_argument(env):  # noqa: F811
    put_model(env.store, "base")
    put_model(env.store, "other", seed=b"o")
    put_adapter(env.store, "ad", "base")
    with pytest.raises(errors.InvalidArgument, match=r"base:latest is the base of 1 model\(s\).*ad:latest") as e:
        call(env.ops, "rm", {"model": "base"})
    assert "llmctl rm --force base" in e.value.hint and e.value.exit_status == 65
    with pytest.raises(errors.InvalidArgument, match="replacing it would break") as e:
        call(env.ops, "tag", {"source": "other", "target": "base", "force": True})
    assert "rm --force base" in e.value.hint
    # transient: a job reading it is still busy (exit 75)
    env.jobs.start("eval", "other:latest", "x:y", {}, 1000)
    with pytest.raises(errors.Busy, match="used by job 1"):
        call(env.ops, "rm", {"model": "other"})


# -- 3: rm says which weights finished jobs keep ---------------------------------------------
def test_i11_ux_3_rm_names_the_jobs_that_keep_its_weights(real, capsys):  # noqa: F811
    man = put_model(real.store, "tiny")
    weights = man["weights"]["digest"]
    job = start(real.runner, "train", "tiny2:latest", {}, {weights})
    job.transition(JobState.RUNNING)
    real.runner.settle(job, None)                     # finished: its record still names the weights
    ctx = call(real.ops, "rm", {"model": "tiny"})
    real.store.writer.submit(lambda: None, lambda *_: None)
    for _ in range(200):
        if ctx.replies:
            break
        import time
        time.sleep(0.01)
    ((kind, r),) = ctx.replies
    assert kind == "ok" and r["kept_by_jobs"] == [job.id] and r["kept_bytes"] == man["weights"]["size"]
    assert r["freed_bytes"] == man["config"]["size"] + man["tokenizer"]["size"]
    assert real.store.has_blob(weights)
    c = Fake(rm={**r, "freed_bytes": 17400, "kept_bytes": 692000})
    assert run(c, "rm", "tiny") == 0
    out = capsys.readouterr().out
    assert "deleted tiny:latest (17.4 KB freed)" in out
    assert f"weights (692.0 KB) kept for job {job.id}" in out and f"(llmctl jobs rm {job.id} frees them)" in out


# -- 4: several models side by side, the data uploaded once ---------------------------------
class Streams(JobsMixin):
    """A client whose socket is a script of replies (``Client._recv`` drops other ids)."""

    def __init__(self, replies):
        self.replies, self.sent, self.uploads, self.cancels = list(replies), [], [], []
        self._sock, self.stream_idle_timeout = object(), 5.0
        self._ids = iter(range(1, 100))

    def _cancel_stale(self):
        pass

    def _send(self, msg):
        self.sent.append(msg)

    def _send_cancel(self, rid):
        self.cancels.append(rid)

    def upload_file(self, path, progress=None):
        self.uploads.append(path)
        return "sha256:" + "ab" * 32

    def _recv(self, rid, timeout):
        while self.replies:
            msg = self.replies.pop(0)
            if msg["id"] != rid:
                continue
            return msg
        raise AssertionError("no reply left")


def test_i11_ux_4_eval_many_uploads_once_and_reads_interleaved_streams(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    end = lambda rid, m, loss: {"id": rid, "type": "end", "body": {"model": m, "examples": 1,  # noqa: E731
                                                                    "metrics": {"loss": loss}, "job": rid}}
    c = Streams([{"id": 2, "type": "chunk", "body": {"stage": "eval"}}, end(2, "b:latest", 0.5),
                 {"id": 1, "type": "chunk", "body": {"stage": "eval"}}, end(1, "a:latest", 0.9)])
    seen = []
    results = c.eval_many(["a", "b"], [str(data)], None, progress=seen.append)
    assert [r["model"] for r in results] == ["a:latest", "b:latest"] and c.uploads == [str(data)]
    assert [m["body"]["model"] for m in c.sent] == ["a", "b"]
    assert {p.get("model") for p in seen} == {"a", "b"}
    assert AnyOf({1, 2}) == 2 and 3 != AnyOf({1, 2})
    bad = Streams([{"id": 2, "type": "error", "body": {"code": 10, "name": "model_not_found",
                                                       "message": "no model nosuch"}}])
    with pytest.raises(errors.LlmosdError, match="nosuch"):
        bad.eval_many(["a", "nosuch"], [str(data)])
    assert bad.cancels == [1]                                           # the other one is cancelled


def test_i11_ux_4_eval_cli_prints_one_column_per_model(tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    results = [{"model": "smol:latest", "examples": 4, "job": 3, "metrics": {"loss": 2.0, "exact_match": 0.0}},
               {"model": "qa:latest", "examples": 4, "job": 4, "metrics": {"loss": 0.5, "exact_match": 1.0}}]
    c = Fake(eval_many=results)
    assert run(c, "eval", "smol", "qa", "--data", str(data)) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.split(r"\s+", out[0]) == ["METRIC", "smol", "qa"]
    assert re.split(r"\s+", out[1]) == ["loss", "2.0000", "0.5000"]
    assert re.split(r"\s+", out[2]) == ["exact_match", "0.0000", "1.0000"]
    assert out[3] == "4 examples (jobs 3, 4)"
    assert c.calls[0][1][:2] == (["smol", "qa"], [str(data)])
    more = tmp_path / "u.jsonl"
    more.write_text('{"prompt": "c", "completion": "d"}\n')
    c = Fake(eval={"model": "qa:latest", "examples": 1, "metrics": {"loss": 1.0}})
    assert run(c, "eval", "qa", "--data", str(data), str(more)) == 0     # old form: files after MODEL
    assert c.calls[0][1] == ("qa", [str(data), str(more)], None)
    assert "-" in side_by_side([{"model": "a", "metrics": {"loss": 1.0}}, {"model": "b", "metrics": {}}])


# -- 5: an eval's result stays in its record; a classifier's loss ----------------------------
def test_i11_ux_5_eval_result_is_kept_in_the_job_record_and_shown(env, monkeypatch, capsys):  # noqa: F811
    import llmosd.train.ftspec as spec_mod
    import llmosd.train.pretrain as pretrain
    monkeypatch.setattr(spec_mod, "check_eval_spec", lambda spec, data, model: dict(spec), raising=False)
    monkeypatch.setattr(pretrain, "pick_device", lambda d: d)
    put_model(env.store, "base")
    put_adapter(env.store, "cls", "base", classifier=True)
    data = data_blob(env.store, b'{"text": "x", "label": "pos"}\n')
    call(env.ops, "eval", {"model": "cls", "data": data})
    env.jobs.run_posted()
    (started,) = env.jobs.started
    job = started.job
    job.transition(JobState.RUNNING)
    metrics = {"loss": 0.4, "perplexity": 1.49, "accuracy": 0.8, "f1": 0.75}
    started.done(job, {"model": "cls:latest", "examples": 5, "metrics": metrics}, None)
    ctx = call(env.ops, "job", {"job": job.id})
    row = ctx.replies[0][1]["job"]
    assert row["metrics"] == {"metrics": metrics, "examples": 5, "loss": 0.4} and row["loss"] == 0.4
    assert call(env.ops, "jobs", {"all": True}).replies[0][1]["jobs"][0]["metrics"]["examples"] == 5
    table = fmt.job_table([row]).splitlines()[1]
    assert " 5 ex " in table and "0.4000" in table
    assert run(Fake(job={"job": row, "spec": {}, "data": {}}), "jobs", "show", str(job.id)) == 0
    assert "result:          loss 0.4, perplexity 1.49, accuracy 0.8, f1 0.75 on 5 examples" in capsys.readouterr().out
    assert job_row(job)["metrics"]["examples"] == 5
    from llmosd.train.metrics import eval_metrics
    assert eval_metrics(["accuracy", "f1"], True) == ["loss", "perplexity", "accuracy", "f1"]
    assert eval_metrics(["accuracy", "f1"], False) == ["accuracy", "f1"]


# -- 6: unload of a base names the adapters that went with it --------------------------------
def test_i11_ux_6_unload_names_the_adapters_attached(env, capsys):  # noqa: F811
    put_model(env.store, "base")
    env.manager.check_unloadable = lambda inst: None
    env.manager.unload = lambda inst, force, done: done()
    inst = env.manager.table.add("base:latest", "sha256:" + "1" * 64, "cpu", 1000)
    inst.attach("qa:latest", "sha256:" + "2" * 64, 1000)
    inst.attach("sent:latest", "sha256:" + "3" * 64, 1000, kind="classifier")
    ctx = call(env.ops, "unload", {"target": "base"})
    assert ctx.replies == [("ok", {"unloaded": [inst.id], "adapters": ["qa:latest", "sent:latest"]})]
    assert run(Fake(unload=ctx.replies[0][1]), "unload", "base") == 0
    assert capsys.readouterr().out.strip() == (f"unloaded instance {inst.id} and the adapters attached to "
                                               "it: qa:latest, sent:latest")


# -- 7: create's vocabulary size too small for the text: invalid input, naming the size ------
def test_i11_ux_7_create_vocab_size_below_the_text_characters_is_a_value_error(tmp_path):
    pytest.importorskip("sentencepiece")
    from llmosd.train.create import create
    text = "".join(chr(0x4e00 + i) for i in range(60)) + "\nabc def\n"
    with pytest.raises(ValueError, match=r"--vocab-size must be at least 3\d\d for this text .*not 300"):
        create({"text": text, "vocab_size": 300, "layers": 1, "dim": 8, "heads": 1}, str(tmp_path), lambda p: None)
    from llmosd.train.create import vocab_error
    other = RuntimeError("something else")
    assert vocab_error(other, 300) is other


# -- 8: show of an adapter: its own parameters and size, and its base's ----------------------
def test_i11_ux_8_show_adapter_says_its_own_size_and_the_base(capsys):
    ad = {"model": "qa:latest", "digest": "sha256:" + "c" * 64, "size": 1_900_000, "config": {},
          "instances": [], "manifest": {"kind": "adapter", "architecture": "llama", "parameters": 460_800,
                                        "base": {"model": "smollm2:latest"},
                                        "tokenizer": {"type": "hf-tokenizers", "vocab_size": 49152},
                                        "lineage": {"method": "finetune", "parent": "smollm2:latest"}}}
    base = {"model": "smollm2:latest", "manifest": {"architecture": "llama", "parameters": 134_515_008}}
    assert architecture(ad, base) == ("adapter of smollm2:latest: 460.8K parameters (1.9 MB); "
                                      "base llama 134.5M")
    plain = {"size": 1_000, "manifest": {"architecture": "llama", "parameters": 100}}
    assert architecture(plain) == "llama  (100 parameters, 1.0 KB)"
    c = Fake(show=lambda m: ad if m == "qa" else base)
    assert run(c, "show", "qa") == 0
    out = capsys.readouterr().out
    assert "architecture:  adapter of smollm2:latest: 460.8K parameters (1.9 MB); base llama 134.5M" in out
    assert json.dumps(ad)         # (the fake's reply is plain data)
