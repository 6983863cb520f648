"""Issue 11 review fixes in the daemon's job and store ops: blobs pinned by finished jobs, a
resumable fine-tune's base, uploads of refused requests, replacing a base, show of an adapter
and the merged classifier's block size.  A real Store, fake clients; the job runner is the
real one where its bookkeeping is the point (``max_jobs=0``: nothing is ever started)."""
from __future__ import annotations

import types

import pytest

from llmctl import errors
from llmosd.jobs.queue import Job, JobState
from llmosd.jobs.records import Records, to_record
from llmosd.jobs.runner import JobRunner
from llmosd.ops import Ops
from llmosd.store.manifest import AdapterManifest, Blob, Lineage
from llmosd.store.store import Store
from llmosd.store.uploads import Uploads
from llmosd.table import ModelTable
from test_ops_finetune import call, data_blob, env, put_adapter, put_model  # noqa: F401 - env: a fixture

Q, R, S, F, C = (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED,
                 JobState.CANCELLED)


@pytest.fixture
def real(tmp_path):
    """Ops over a real JobRunner that never starts a worker; the store keeps what it pins."""
    store = Store(str(tmp_path / "store"))
    records = Records(str(tmp_path / "jobs"))
    runner = JobRunner(lambda fn, *a: fn(*a), store.root, records, max_jobs=0)
    store.extra_refs = runner.refs
    cfg = types.SimpleNamespace(max_uploads=64, max_uploads_per_client=8, default_max_tokens=64)
    manager = types.SimpleNamespace(table=ModelTable(), tasks={}, device="cpu")
    ops = Ops(cfg, store, manager, runner, Uploads(store, post=lambda fn, *a: fn(*a)))
    return types.SimpleNamespace(store=store, records=records, runner=runner, ops=ops, tmp=tmp_path)


def start(runner, kind, model="m:latest", spec=None, refs=(), data=None):
    return runner.start(kind, model, "x:y", dict(spec or {}), 1000, data=data, refs=refs)


# -- 1: only train and finetune keep their blobs once finished ---------------------------------
def test_i11_review_1_merge_and_import_release_their_blobs_when_they_end(real):
    base = put_model(real.store, "base")
    put_adapter(real.store, "ad", "base")
    pinned = real.store.blob_digests(base)
    runner = real.runner
    merge = start(runner, "merge", "merged:latest",
                  {"_adapter_name": "ad:latest", "_base": {"name": "base:latest"}}, pinned)
    imp = start(runner, "import", "imp:latest", {"_base": {"name": "base:latest"}}, pinned)
    train = start(runner, "finetune", "ft:latest", {"_base": {"name": "base:latest"}}, {"sha256:" + "f" * 64})
    assert pinned <= runner.refs()
    merge.transition(R)
    runner.settle(merge, None)                       # published
    assert merge.state is S and merge.refs == [] and pinned <= runner.refs()   # the import still reads
    imp.transition(R)
    runner.settle(imp, "the adapter does not fit")   # failed while publishing
    assert imp.refs == [] and runner.refs() == {"sha256:" + "f" * 64}
    train.transition(R)
    runner.settle(train, None)                       # a training job keeps its data (resume, jobs rm)
    assert runner.refs() == {"sha256:" + "f" * 64}
    # a queued job cancelled, and a worker that failed, let go too
    ev = start(runner, "eval", "base:latest", {}, pinned)
    runner.stop(ev, "cancel")
    assert ev.state is C and runner.refs() == {"sha256:" + "f" * 64}
    mg = start(runner, "merge", "m2:latest", {}, pinned)
    mg.transition(R)
    mg.process = object()
    runner._ended(mg, mg.process, "exit", -9)
    assert mg.state is F and mg.refs == [] and runner.refs() == {"sha256:" + "f" * 64}
    # the effect: rm --force of the base frees its weights
    ctx = call(real.ops, "rm", {"model": "base", "force": True})
    ((kind, reply),) = ctx.replies
    assert kind == "ok" and reply["removed"] == ["ad:latest"]
    assert not real.store.has_blob(base["weights"]["digest"])


def test_i11_review_1_jobs_cut_off_by_a_restart_pin_nothing(real):
    """An eval or merge that was running when the daemon was killed is failed at the next
    start without keeping its blobs; a merge failed by an older daemon (refs in its record)
    neither.  A training job keeps them."""
    pinned = sorted(real.store.blob_digests(put_model(real.store, "base")))
    keep = "sha256:" + "d" * 64
    jobs = [Job(1, "eval", "base:latest", 1, refs=pinned, state=R),
            Job(2, "merge", "m:latest", 1, refs=pinned, state=Q),
            Job(3, "merge", "n:latest", 1, refs=pinned, state=F),
            Job(4, "finetune", "ft:latest", 1, refs=[keep, *pinned], state=F)]
    for j in jobs:
        real.records.make_dir(j.id)
        real.records.save(to_record(j))
    loaded = real.records.load()
    assert {j.id: j.refs for j in loaded} == {1: [], 2: [], 3: [], 4: [keep, *pinned]}
    runner = JobRunner(lambda fn, *a: fn(*a), real.store.root, real.records, max_jobs=0, jobs=loaded)
    assert runner.jobs[1].state is F and runner.jobs[2].state is F
    assert runner.refs() == {keep, *pinned}
    runner.jobs[4].refs = [keep]                     # the finetune's base is another story (item 2)
    runner._update_refs()
    assert runner.refs() == {keep}
    # what the next start's recovery sees (records saved with the refs dropped)
    assert {j.id: j.refs for j in real.records.load()}[1] == []


# -- 2: a failed (resumable) finetune still reads its base ----------------------------------------
def test_i11_review_2_a_failed_finetune_keeps_its_base_from_rm(real):
    put_model(real.store, "base")
    ft = start(real.runner, "finetune", "ft:latest", {"_base": {"name": "base:latest"}})
    ev = start(real.runner, "eval", "base:latest", {})
    for j in (ft, ev):
        j.transition(R)
        j.transition(F, "worker killed by signal 9")
    assert ft.resumable() and real.runner.readers("base:latest") == [ft.id]
    with pytest.raises(errors.Busy, match=f"used by job {ft.id} .*failed and resumable") as e:
        call(real.ops, "rm", {"model": "base"})
    assert "jobs rm" in e.value.hint and real.store.get("base")
    done = []
    real.runner.remove(ft, lambda r, err: done.append(err))
    assert done == [None] and real.runner.readers("base:latest") == []
    ((kind, _),) = call(real.ops, "rm", {"model": "base"}).replies
    assert kind == "ok"


# -- 3: a refused eval, finetune or train leaves no uploads behind ---------------------------------
def test_i11_review_3_refused_eval_discards_its_data(env, monkeypatch):  # noqa: F811
    import llmosd.train.pretrain as pretrain
    import llmosd.train.ftspec as spec_mod
    monkeypatch.setattr(pretrain, "pick_device", lambda d: d)
    monkeypatch.setattr(spec_mod, "check_eval_spec", lambda spec, data, model: dict(spec), raising=False)
    put_model(env.store, "base")
    put_adapter(env.store, "ad", "base")

    def fresh(n):
        return data_blob(env.store, b'{"text": "%d"}\n' % n)
    # the model is unknown
    data = fresh(1)
    with pytest.raises(errors.ModelNotFound):
        call(env.ops, "eval", {"model": "nope", "data": data})
    assert not env.store.has_blob(data["train.jsonl"])
    # a data file was not uploaded: the others go
    data = {**fresh(2), "missing.jsonl": "sha256:" + "0" * 64}
    with pytest.raises(errors.InvalidArgument, match="has not been uploaded"):
        call(env.ops, "eval", {"model": "base", "data": data})
    assert not env.store.has_blob(data["train.jsonl"])
    # the spec is refused (on the checking thread)
    monkeypatch.setattr(spec_mod, "check_eval_spec",
                        lambda *a: (_ for _ in ()).throw(ValueError("train.jsonl line 1: bad")))
    data = fresh(3)
    ctx = call(env.ops, "eval", {"model": "base", "data": data})
    env.jobs.run_posted()
    assert isinstance(ctx.streams[0].err, errors.InvalidArgument)
    assert not env.store.has_blob(data["train.jsonl"])
    monkeypatch.setattr(spec_mod, "check_eval_spec", lambda spec, data, model: dict(spec))
    # the client went away while it was checked
    data = fresh(4)
    ctx = call(env.ops, "eval", {"model": "base", "data": data})
    ctx.on_cancel("the client went away")
    env.jobs.run_posted()
    assert not env.store.has_blob(data["train.jsonl"])
    # the job could not be queued (the disk)
    monkeypatch.setattr(env.jobs, "start", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    data = fresh(5)
    ctx = call(env.ops, "eval", {"model": "ad", "data": data})
    env.jobs.run_posted()
    assert isinstance(ctx.streams[0].err, errors.StoreCorrupt)
    assert not env.store.has_blob(data["train.jsonl"])
    # the base of the adapter is gone
    env.store.remove("base")
    data = fresh(6)
    with pytest.raises(errors.ModelNotFound, match="is gone"):
        call(env.ops, "eval", {"model": "ad", "data": data})
    assert not env.store.has_blob(data["train.jsonl"])
    assert env.jobs.started == [] and env.jobs.reserved == {}


def test_i11_review_3_refused_finetune_and_train_discard_their_data(env, monkeypatch):  # noqa: F811
    import llmosd.ops.jobs as ops_jobs
    import llmosd.train.distributed as distributed
    import llmosd.train.pretrain as pretrain
    import llmosd.train.ftspec as spec_mod
    monkeypatch.setattr(pretrain, "pick_device", lambda d: d)
    monkeypatch.setattr(distributed, "check_nproc", lambda s: None)
    monkeypatch.setattr(spec_mod, "check_finetune_spec",
                        lambda *a: (_ for _ in ()).throw(ValueError("train.jsonl line 1: bad")), raising=False)
    put_model(env.store, "base")
    put_adapter(env.store, "ad", "base")
    data, val = data_blob(env.store, b'{"text": "a"}\n'), {"v.jsonl": env.store.put_blob(b'{"text": "v"}\n')[0]}
    with pytest.raises(errors.InvalidArgument, match="is an adapter"):
        call(env.ops, "finetune", {"base": "ad", "name": "ft", "data": data, "val_data": val, "spec": {}})
    assert not env.store.has_blob(data["train.jsonl"]) and not env.store.has_blob(val["v.jsonl"])
    data = data_blob(env.store, b'{"text": "b"}\n')
    ctx = call(env.ops, "finetune", {"base": "base", "name": "ft", "data": data, "spec": {}})
    env.jobs.run_posted()
    assert ctx.replies[0][0] == "error" and not env.store.has_blob(data["train.jsonl"])
    # train: refused at submit and on the checking thread
    data = data_blob(env.store, b"some text")
    with pytest.raises(errors.InvalidArgument, match="training it further would break"):
        call(env.ops, "train", {"name": "base", "data": data, "spec": {}})
    assert not env.store.has_blob(data["train.jsonl"])
    monkeypatch.setattr(ops_jobs, "check_train", lambda *a: (_ for _ in ()).throw(ValueError("too little data")))
    data = data_blob(env.store, b"other text")
    ctx = call(env.ops, "train", {"name": "new", "data": data, "spec": {}})
    env.jobs.run_posted()
    assert ctx.replies[0][0] == "error" and "too little" in ctx.replies[0][1].message
    assert not env.store.has_blob(data["train.jsonl"])
    assert env.jobs.started == [] and env.jobs.reserved == {}


# -- 4: a base with adapters is never replaced ----------------------------------------------------
def test_i11_review_4_replacing_a_base_with_force_is_refused(env):  # noqa: F811
    base = put_model(env.store, "base")
    put_model(env.store, "other", seed=b"o")
    put_adapter(env.store, "ad", "base")
    put_adapter(env.store, "ad2", "other")
    digest = env.store.get("base")[2]
    with pytest.raises(errors.InvalidArgument, match=r"base:latest is the base of 1 model\(s\).*ad:latest") as e:
        call(env.ops, "tag", {"source": "other", "target": "base", "force": True})
    assert "rm --force base" in e.value.hint and "another" in e.value.hint
    with pytest.raises(errors.InvalidArgument, match="replacing it would break"):
        call(env.ops, "merge", {"adapter": "ad2", "name": "base", "force": True})
    with pytest.raises(errors.InvalidArgument, match="ad:latest"):
        call(env.ops, "finetune", {"base": "other", "name": "base", "data": data_blob(env.store),
                                   "spec": {}, "force": True})
    with pytest.raises(errors.InvalidArgument, match="ad:latest"):
        call(env.ops, "create", {"name": "base", "layers": 1, "dim": 8, "heads": 1, "text": "abc",
                                 "force": True})
    files = {"adapter_config.json": env.store.put_blob(b"{}")[0]}
    with pytest.raises(errors.InvalidArgument, match="ad:latest"):
        call(env.ops, "import", {"name": "base", "files": files, "format": "peft", "base": "other",
                                 "force": True})
    assert env.store.get("base")[2] == digest and env.store.get("base")[1]["weights"] == base["weights"]
    assert env.jobs.started == []
    # a model nothing depends on is still replaced with force
    ((kind, _),) = call(env.ops, "tag", {"source": "base", "target": "other2"}).replies
    ((kind, reply),) = call(env.ops, "tag", {"source": "other", "target": "other2", "force": True}).replies
    assert kind == "ok" and reply["model"] == "other2:latest"


# -- 5: show of an adapter lists the instances it is attached to ----------------------------------
def test_i11_review_5_show_of_an_attached_adapter_lists_its_host(env):  # noqa: F811
    put_model(env.store, "base")
    put_adapter(env.store, "ad", "base")
    inst = env.manager.table.add("base:latest", env.store.get("base")[2], "cpu", 1000)
    inst.attach("ad:latest", env.store.get("ad")[2], 1000)
    (reply,) = [r for _, r in call(env.ops, "show", {"model": "ad"}).replies]
    assert [r["id"] for r in reply["instances"]] == [inst.id]
    (row,) = [r for r in call(env.ops, "ls", {}).replies[0][1]["models"] if r["model"] == "ad:latest"]
    assert row["instances"] == [inst.id]
    (reply,) = [r for _, r in call(env.ops, "show", {"model": "base"}).replies]
    assert [r["id"] for r in reply["instances"]] == [inst.id]


def test_i11_review_5_man_page_documents_unload_of_an_adapter():
    import pathlib
    text = (pathlib.Path(__file__).parents[2] / "man" / "llmosd-protocol.7").read_text()
    assert "{unloaded: [], detached: [id], model}" in text


# -- 6: a merged classifier keeps the block size it was trained with -------------------------------
def test_i11_review_6_merge_lineage_keeps_the_block_size():
    from llmosd.ops.serve import head_max_len
    from llmosd.train.merge import merge_args
    w = {"digest": "sha256:" + "1" * 64, "size": 4}
    bman = {"config": w, "tokenizer": {**w, "type": "sentencepiece", "vocab_size": 10},
            "weights": {**w, "dtype": "float32"}}
    cls = AdapterManifest(base=bman, base_name="b:latest", base_digest="sha256:" + "2" * 64,
                          lineage=Lineage("finetune", "b:latest", {"method": "classify", "block_size": 24}),
                          parameters=8, head=Blob("sha256:" + "3" * 64, 4), labels=["a", "b"]).to_dict()
    assert head_max_len(cls) == 24
    spec = {"_adapter": cls, "_adapter_name": "c:latest", "_adapter_digest": "sha256:" + "4" * 64,
            "_base": {"name": "b:latest", "digest": "sha256:" + "2" * 64}}
    args = merge_args(spec)
    assert args == {"adapter_digest": "sha256:" + "4" * 64, "base": "b:latest",
                    "base_digest": "sha256:" + "2" * 64, "block_size": 24}
    merged = {"kind": "classifier", "lineage": Lineage("merge", "c:latest", args).to_dict()}
    assert head_max_len(merged) == 24
    no_size = {**spec, "_adapter": {**cls, "lineage": {"method": "import", "args": {}}}}
    assert "block_size" not in merge_args(no_size)
