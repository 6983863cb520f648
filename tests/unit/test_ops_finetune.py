"""Issue 11, the daemon's side: finetune, eval, merge, import of PEFT adapters, rm of bases,
ls and export of adapters, and the job kinds, over a real Store with fake clients and a fake
job runner (no worker, no torch)."""
from __future__ import annotations

import json
import queue
import sys
import types

import pytest

from llmctl import errors
from llmosd.jobs.queue import Job, JobState, after_restart, reads
from llmosd.ops import Ops
from llmosd.store.manifest import AdapterManifest, Blob, Lineage
from llmosd.store.store import Store
from llmosd.store.uploads import Uploads
from llmosd.table import ModelTable


class Stream:
    """``server.Stream`` as handlers see it: chunks, then one end or error (``closed``)."""

    def __init__(self):
        self.chunks, self.result, self.err, self.closed = [], None, None, False

    def chunk(self, body, on_sent=None):
        assert not self.closed
        self.chunks.append(body)

    def end(self, body):
        assert not self.closed
        self.result, self.closed = body, True

    def error(self, err):
        assert not self.closed
        self.err, self.closed = err, True


class FakeCtx:
    def __init__(self, type_, body, uid=1000):
        self.type, self.body, self.rid = type_, body, 1
        self.peer = types.SimpleNamespace(ident=b"p1", uid=uid, holds=set(), streams={})
        self.replies, self.streams, self.on_cancel = [], [], None

    @property
    def uid(self):
        return self.peer.uid

    def ok(self, body=None):
        self.replies.append(("ok", body))

    def error(self, err):
        self.replies.append(("error", err))

    def stream(self, on_cancel):
        self.on_cancel = on_cancel
        self.streams.append(Stream())
        return self.streams[-1]


class FakeJobs:
    """The runner's surface the handlers use; jobs are recorded, never run.  ``post`` queues
    (``run_posted`` plays the loop)."""

    def __init__(self):
        self.jobs, self.started, self.reserved, self.calls = {}, [], {}, queue.SimpleQueue()
        self.cancelled, self.notes = [], []

    def post(self, fn, *args):
        self.calls.put((fn, args))

    def run_posted(self, timeout=10.0):
        fn, args = self.calls.get(timeout=timeout)
        fn(*args)

    def reserve(self, key, refs):
        self.reserved[key] = set(refs)

    def release(self, key):
        self.reserved.pop(key, None)

    def start(self, kind, target, func, spec, uid, on_progress=None, on_done=None, **kw):
        job = Job(len(self.jobs) + 1, kind, target, uid, spec=spec, data=kw.get("data") or {},
                  refs=sorted(kw.get("refs") or ()), device=kw.get("device", "cpu"))
        self.jobs[job.id] = job
        self.started.append(types.SimpleNamespace(job=job, func=func, progress=on_progress,
                                                  done=on_done, kw=kw))
        return job

    def writing(self, target):
        return any(j.model == target and j.kind != "eval" and not j.is_finished()
                   for j in self.jobs.values())

    def readers(self, model):
        return sorted(j.id for j in self.jobs.values() if not j.is_finished() and model in reads(j))

    def cancel(self, job_id):
        self.cancelled.append(job_id)

    def settle(self, job, reason):
        job.transition(JobState.SUCCEEDED if reason is None else JobState.FAILED, reason)

    def drop_refs(self, job):
        job.refs = []

    def note(self, job, text):
        self.notes.append(text)


@pytest.fixture
def env(tmp_path):
    store = Store(str(tmp_path / "store"))
    jobs = FakeJobs()
    cfg = types.SimpleNamespace(max_uploads=64, max_uploads_per_client=8, default_max_tokens=64)
    manager = types.SimpleNamespace(table=ModelTable(), tasks={}, device="cpu")
    ops = Ops(cfg, store, manager, jobs, Uploads(store, post=lambda fn, *a: fn(*a)))
    return types.SimpleNamespace(store=store, jobs=jobs, ops=ops, manager=manager)


def call(ops, type_, body, uid=1000):
    ctx = FakeCtx(type_, body, uid)
    ops.dispatch(ctx)
    return ctx


def put_model(store, name, seed=b"m"):
    """A full model (config, tokenizer, weights blobs); returns its manifest."""
    cfg = store.put_blob(json.dumps({"max_position_embeddings": 64, "seed": seed.decode()}).encode())
    tok = store.put_blob(b"tok" + seed)
    w = store.put_blob(b"weights" + seed * 10)
    man = {"schema": 1, "architecture": "llama", "parameters": 100,
           "config": {"digest": cfg[0], "size": cfg[1], "media": "application/json"},
           "tokenizer": {"digest": tok[0], "size": tok[1], "type": "sentencepiece", "vocab_size": 10},
           "weights": {"digest": w[0], "size": w[1], "format": "safetensors", "dtype": "float32"},
           "lineage": {"method": "create", "parent": None, "args": {}}}
    store.write_manifest(name, man)
    return man


def put_adapter(store, name, base, classifier=False, payload=b"lora"):
    """An adapter (or a classifier with a head) on stored model ``base``; returns its manifest."""
    bcanon, bman, bdigest = store.get(base)
    blob = Blob(*store.put_blob(payload + name.encode()))
    kw = ({"head": blob, "labels": ["neg", "pos"]} if classifier else
          {"adapter": blob, "lora": {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}})
    man = AdapterManifest(base=bman, base_name=bcanon, base_digest=bdigest,
                          lineage=Lineage("finetune", bcanon), parameters=8, **kw).to_dict()
    store.write_manifest(name, man)
    return man


def data_blob(store, text=b'{"prompt": "a", "completion": "b"}\n'):
    return {"train.jsonl": store.put_blob(text)[0]}


# -- the refusals -----------------------------------------------------------------------
def test_i11_refuses_adapter_as_base(env):
    put_model(env.store, "base")
    put_adapter(env.store, "ad", "base")
    data = data_blob(env.store)
    body = {"base": "ad", "name": "ft", "data": data, "spec": {}}
    with pytest.raises(errors.InvalidArgument, match="ad:latest is an adapter on base:latest") as e:
        call(env.ops, "finetune", body)
    assert "merge" in e.value.hint and "base:latest" in e.value.hint
    assert not env.store.has_blob(data["train.jsonl"])      # refused: its upload is not kept
    put_adapter(env.store, "cls", "base", classifier=True)
    data_blob(env.store)                                    # uploaded again
    with pytest.raises(errors.InvalidArgument, match="is a classifier on base:latest"):
        call(env.ops, "finetune", {**body, "base": "cls"})
    data_blob(env.store)
    merged = dict(env.store.get("base")[1], kind="classifier", head={"digest": data["train.jsonl"],
                                                                      "size": 1, "labels": ["a", "b"]})
    env.store.write_manifest("merged", merged)           # names the data blob: kept from now on
    with pytest.raises(errors.InvalidArgument, match="merged:latest is a classifier"):
        call(env.ops, "finetune", {**body, "base": "merged"})
    with pytest.raises(errors.InvalidArgument, match="a name of its own"):
        call(env.ops, "finetune", {**body, "base": "base", "name": "base"})
    assert env.jobs.started == [] and env.jobs.reserved == {}


def test_i11_refuses_rm_of_base_with_adapters_without_force(env):
    base = put_model(env.store, "base")
    a1, a2 = put_adapter(env.store, "ad1", "base"), put_adapter(env.store, "ad2", "base", classifier=True)
    put_model(env.store, "other", seed=b"o")
    with pytest.raises(errors.InvalidArgument, match=r"base:latest is the base of 2 model\(s\).*ad1:latest, ad2:latest") as e:
        call(env.ops, "rm", {"model": "base"})
    assert "--force" in e.value.hint
    assert env.store.get("base") and env.store.get("ad1")              # nothing removed
    ctx = call(env.ops, "rm", {"model": "base", "force": True})
    ((kind, reply),) = ctx.replies
    assert kind == "ok" and reply["model"] == "base:latest" and reply["removed"] == ["ad1:latest", "ad2:latest"]
    own = a1["adapter"]["size"] + a2["head"]["size"]
    assert reply["freed_bytes"] == sum(base[k]["size"] for k in ("config", "tokenizer", "weights")) + own
    assert [m for m, _, _ in env.store.list()] == ["other:latest"]
    for d in (a1["adapter"]["digest"], a2["head"]["digest"], base["weights"]["digest"]):
        assert not env.store.has_blob(d)


def test_i11_refuses_import_peft_without_base(env):
    put_model(env.store, "base")
    put_adapter(env.store, "ad", "base")
    files = {"adapter_config.json": env.store.put_blob(b"{}")[0],
             "adapter_model.safetensors": env.store.put_blob(b"tensors")[0]}
    body = {"name": "imp", "files": files, "format": "peft"}
    with pytest.raises(errors.InvalidArgument, match="none was given") as e:
        call(env.ops, "import", body)
    assert "--base MODEL" in e.value.hint
    assert not any(env.store.has_blob(d) for d in files.values())      # refused: no orphans
    files = {k: env.store.put_blob(v)[0] for k, v in (("adapter_config.json", b"{}"),
                                                       ("adapter_model.safetensors", b"tensors"))}
    with pytest.raises(errors.InvalidArgument, match="is an adapter on base:latest"):
        call(env.ops, "import", {**body, "files": files, "base": "ad"})
    files = {k: env.store.put_blob(v)[0] for k, v in (("config.json", b"{}"),)}
    with pytest.raises(errors.InvalidArgument, match="only for a PEFT adapter"):
        call(env.ops, "import", {"name": "x", "files": files, "base": "base"})
    # with its base: a job of formats.peft:import_adapter, the base's blobs kept while it runs
    files = {k: env.store.put_blob(v)[0] for k, v in (("adapter_config.json", b"{}"),
                                                       ("adapter_model.safetensors", b"tensors"))}
    ctx = call(env.ops, "import", {**body, "files": files, "base": "base"})
    (s,) = ctx.streams
    (started,) = env.jobs.started
    assert started.func == "llmosd.formats.peft:import_adapter" and started.job.kind == "import"
    spec = started.job.spec
    assert spec["_base"]["name"] == "base:latest" and spec["_base"]["manifest"]["weights"]
    assert spec["_base"]["digest"] == env.store.get("base")[2] and "base" not in spec
    assert env.store.get("base")[1]["weights"]["digest"] in started.kw["refs"]


def test_i11_refuses_eval_of_model_whose_base_is_gone(env):
    put_model(env.store, "base")
    put_adapter(env.store, "ad", "base")
    env.store.remove("base")
    data = data_blob(env.store)
    with pytest.raises(errors.ModelNotFound, match="the base model base:latest of ad:latest is gone"):
        call(env.ops, "eval", {"model": "ad", "data": data})
    with pytest.raises(errors.ModelNotFound, match="is gone"):
        call(env.ops, "merge", {"adapter": "ad", "name": "m"})
    assert env.jobs.started == [] and env.jobs.reserved == {}


# -- the rest of the ops ------------------------------------------------------------------------
def test_i11_finetune_queues_a_job_with_its_base(env, monkeypatch):
    import llmosd.train.distributed as distributed
    import llmosd.train.pretrain as pretrain
    import llmosd.train.ftspec as spec_mod
    seen = {}

    def check(spec, data, val, base):
        seen.update(spec=spec, data=data, val=val, base=base)
        return {**spec, "method": "lora", "max_steps": 4, "device": "auto"}
    monkeypatch.setattr(spec_mod, "check_finetune_spec", check, raising=False)
    monkeypatch.setattr(pretrain, "pick_device", lambda d: d)
    monkeypatch.setattr(distributed, "check_nproc", lambda s: None)
    bman = put_model(env.store, "base")
    data, val = data_blob(env.store), {"val.jsonl": env.store.put_blob(b'{"text": "v"}\n')[0]}
    ctx = call(env.ops, "finetune", {"base": "base", "name": "ft", "data": data, "val_data": val,
                                     "spec": {"rank": 4}, "priority": 2})
    assert ctx.replies == [] and len(env.jobs.reserved) == 1          # checked off the loop
    env.jobs.run_posted()
    ((kind, reply),) = ctx.replies
    assert kind == "ok" and reply["job"]["kind"] == "finetune" and reply["job"]["model"] == "ft:latest"
    assert seen["base"] == {"name": "base:latest", "context": 64, "has_template": False,
                            "targets_known": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj")}
    assert seen["data"] == {"train.jsonl": b'{"prompt": "a", "completion": "b"}\n'}
    assert seen["val"] == {"val.jsonl": b'{"text": "v"}\n'} and seen["spec"] == {"rank": 4}
    (started,) = env.jobs.started
    wspec = started.job.spec
    assert started.func == "llmosd.train.finetune:run" and started.kw["priority"] == 2
    assert wspec["_base"] == {"name": "base:latest", "digest": env.store.get("base")[2],
                              **{k: bman[k] for k in ("config", "tokenizer", "weights")}}
    assert wspec["device"] == "cpu" and wspec["data"] == data and wspec["val_data"] == val
    assert set(started.kw["refs"]) == set(data.values()) | set(val.values()) | env.store.blob_digests(bman)
    assert env.jobs.reserved == {}
    # the base is read by the queued job: rm refuses it
    with pytest.raises(errors.Busy, match="used by job 1"):
        call(env.ops, "rm", {"model": "base"})
    # a spec the check refuses: invalid_argument, nothing queued
    monkeypatch.setattr(spec_mod, "check_finetune_spec",
                        lambda *a: (_ for _ in ()).throw(ValueError("train.jsonl line 1: bad")))
    ctx = call(env.ops, "finetune", {"base": "base", "name": "ft2", "data": data, "spec": {}})
    env.jobs.run_posted()
    ((kind, err),) = ctx.replies
    assert kind == "error" and isinstance(err, errors.InvalidArgument) and "line 1" in err.message
    assert len(env.jobs.started) == 1 and env.jobs.reserved == {}


def test_i11_eval_streams_metrics_and_cancels(env, monkeypatch):
    import llmosd.train.pretrain as pretrain
    import llmosd.train.ftspec as spec_mod
    monkeypatch.setattr(spec_mod, "check_eval_spec", lambda spec, data, model: {**spec, "model_seen": model},
                        raising=False)
    monkeypatch.setattr(pretrain, "pick_device", lambda d: d)
    put_model(env.store, "base")
    put_adapter(env.store, "cls", "base", classifier=True)
    data = data_blob(env.store, b'{"text": "x", "label": "pos"}\n')
    ctx = call(env.ops, "eval", {"model": "cls", "data": data, "spec": {"eval_samples": 5}})
    (stream,) = ctx.streams
    env.jobs.run_posted()
    (started,) = env.jobs.started
    job, wspec = started.job, started.job.spec
    assert started.func == "llmosd.train.metrics:run_eval" and job.kind == "eval" and job.model == "cls:latest"
    assert wspec["model_seen"] == {"kind": "classifier", "labels": ["neg", "pos"], "has_template": False,
                                   "context": 64}
    assert wspec["_model"]["kind"] == "classifier" and wspec["_base"]["name"] == "base:latest"
    assert wspec["model"] == "cls:latest" and wspec["data"] == data and wspec["eval_samples"] == 5
    assert not env.jobs.writing("cls:latest")                  # an eval makes no model
    with pytest.raises(errors.Busy, match="used by job 1"):
        call(env.ops, "rm", {"model": "cls"})
    job.transition(JobState.RUNNING)
    started.progress(job, {"stage": "eval", "message": "3/5"})
    started.done(job, {"model": "cls:latest", "examples": 5, "metrics": {"accuracy": 0.8, "f1": 0.75}}, None)
    assert stream.chunks[-1] == {"stage": "eval", "message": "3/5"}
    assert stream.result == {"model": "cls:latest", "examples": 5, "metrics": {"accuracy": 0.8, "f1": 0.75},
                             "job": 1}
    assert job.state is JobState.SUCCEEDED and job.refs == [] and "accuracy 0.8" in env.jobs.notes[0]
    assert not env.store.has_blob(data["train.jsonl"])        # its data is released
    # Ctrl-C: the stream's cancel cancels the job
    data = data_blob(env.store, b'{"text": "y", "label": "neg"}\n')
    ctx = call(env.ops, "eval", {"model": "base", "data": data})
    env.jobs.run_posted()
    ctx.on_cancel("cancelled by the client")
    assert env.jobs.cancelled == [2] and env.jobs.jobs[2].spec["_base"] is None
    # cancelled while still being checked: ends at once, nothing is queued
    ctx = call(env.ops, "eval", {"model": "base", "data": data})
    ctx.on_cancel("the client went away")
    env.jobs.run_posted()
    assert isinstance(ctx.streams[0].err, errors.Cancelled) and len(env.jobs.started) == 2
    assert env.jobs.reserved == {}


def test_i11_merge_queues_a_job_making_a_new_model(env):
    put_model(env.store, "base")
    aman = put_adapter(env.store, "ad", "base")
    with pytest.raises(errors.InvalidArgument, match="base:latest is not an adapter"):
        call(env.ops, "merge", {"adapter": "base", "name": "m"})
    with pytest.raises(errors.AlreadyExists):
        call(env.ops, "merge", {"adapter": "ad", "name": "base"})
    ctx = call(env.ops, "merge", {"adapter": "ad", "name": "merged"})
    (started,) = env.jobs.started
    assert started.func == "llmosd.train.merge:run" and started.job.kind == "merge"
    assert started.job.model == "merged:latest" and len(ctx.streams) == 1
    spec = started.job.spec
    assert spec["_adapter_name"] == "ad:latest" and spec["_adapter"]["adapter"] == aman["adapter"]
    assert spec["_base"]["name"] == "base:latest" and spec["_adapter_digest"] == env.store.get("ad")[2]
    assert aman["adapter"]["digest"] in started.kw["refs"]


def test_i11_ls_rows_show_kind_and_base_and_own_size(env):
    put_model(env.store, "base")
    aman = put_adapter(env.store, "ad", "base")
    rows = {r["model"]: r for r in call(env.ops, "ls", {}).replies[0][1]["models"]}
    assert (rows["base:latest"]["kind"], rows["base:latest"]["base"]) == ("model", None)
    assert (rows["ad:latest"]["kind"], rows["ad:latest"]["base"]) == ("adapter", "base:latest")
    assert rows["ad:latest"]["size"] == aman["adapter"]["size"]         # the base's blobs not counted


def test_i11_rm_of_an_adapter_attached_to_an_instance_is_refused(env):
    put_model(env.store, "base")
    put_adapter(env.store, "ad", "base")
    inst = env.manager.table.add("base:latest", env.store.get("base")[2], "cpu", 1000)
    inst.attach("ad:latest", env.store.get("ad")[2], 1000)
    with pytest.raises(errors.Busy, match=f"ad:latest is loaded.*instance {inst.id}"):
        call(env.ops, "rm", {"model": "ad"})
    with pytest.raises(errors.Busy, match="base:latest is loaded"):
        call(env.ops, "rm", {"model": "base", "force": True})


def test_i11_export_of_adapter_and_classifier(env, monkeypatch):
    put_model(env.store, "base")
    aman = put_adapter(env.store, "ad", "base")
    put_adapter(env.store, "cls", "base", classifier=True)
    fake = types.ModuleType("llmosd.formats.peft")
    fake.adapter_files = lambda man: [{"name": "adapter_config.json", "data": b"{}"},
                                      {"name": "adapter_model.safetensors", **{k: man["adapter"][k]
                                                                              for k in ("digest", "size")}}]
    monkeypatch.setitem(sys.modules, "llmosd.formats.peft", fake)
    files = env.ops.export_ops.files("ad:latest", env.store.get("ad")[1])
    assert files[1] == {"name": "adapter_model.safetensors", "digest": aman["adapter"]["digest"],
                        "size": aman["adapter"]["size"]}
    with pytest.raises(errors.InvalidArgument, match="cls:latest is a classifier") as e:
        env.ops.export_ops.files("cls:latest", env.store.get("cls")[1])
    assert "llmctl export base:latest" in e.value.hint


def test_i11_job_kinds_finetune_resumes_eval_does_not():
    ft = Job(1, "finetune", "ft:latest", 1, spec={"_base": {"name": "b:latest"}}, state=JobState.RUNNING)
    ev = Job(2, "eval", "m:latest", 1, state=JobState.RUNNING)
    mg = Job(3, "merge", "n:latest", 1, spec={"_adapter_name": "a:latest", "_base": {"name": "b:latest"}},
             state=JobState.QUEUED)
    assert after_restart(ft) and ft.state is JobState.QUEUED
    assert after_restart(ev) and ev.state is JobState.FAILED and "run it again" in ev.reason
    assert after_restart(mg) and mg.state is JobState.FAILED
    assert ev.resumable() is False and Job(4, "finetune", "x", 1, state=JobState.FAILED).resumable()
    assert reads(ft) == {"b:latest"} and reads(ev) == {"m:latest"} and reads(mg) == {"a:latest", "b:latest"}
    assert ft.row()["nproc"] is None and ft.row()["kind"] == "finetune"
