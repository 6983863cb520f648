"""Job records on disk (``jobs/records.py``): round trip, ids that keep increasing, the log and
metrics files and their replay in time order.  A temporary directory, no daemon."""
from __future__ import annotations

import json
import os

from llmosd.jobs.queue import Job, JobState
from llmosd.jobs.records import Records, from_record, line_time, stamp, to_record


def sample(id_=3) -> Job:
    j = Job(id_, "train", "m:latest", 1000, spec={"max_steps": 10, "_parent": {"name": "p"}},
            data={"a.txt": "sha256:" + "a" * 64}, refs=["sha256:" + "a" * 64], priority=2,
            device="cpu", created=1.5)
    j.transition(JobState.RUNNING, now=2.0)
    j.update_metrics({"step": 4, "loss": 3.0, "val_loss": 3.2, "time": 2.5})
    j.checkpoint_step = 4
    j.process = object()                      # runtime only: not saved
    return j


def test_i10_2_record_round_trip(tmp_path):
    r = Records(str(tmp_path / "jobs"))
    j = sample()
    r.make_dir(j.id)
    r.save(to_record(j))
    assert oct(os.stat(r.path(3, "record.json")).st_mode & 0o777) == "0o640"
    (back,) = r.load()
    assert to_record(back) == to_record(j) and back.state is JobState.RUNNING
    assert back.process is None and back.val_loss == 3.2 and back.row()["step"] == 4
    assert [n for n in os.listdir(r.path(3)) if n.startswith(".record-")] == []   # no temp left


def test_i10_2_create_text_is_not_kept(tmp_path):
    j = Job(1, "create", "m:latest", None, spec={"text": b"x" * 100, "layers": 2})
    assert to_record(j)["spec"] == {"text": {"bytes": 100}, "layers": 2}
    json.dumps(to_record(j))


def test_i10_2_bad_records_are_skipped(tmp_path):
    r = Records(str(tmp_path))
    for id_, text in ((1, "{not json"), (2, json.dumps({"id": 2})), (4, json.dumps(to_record(sample(5))))):
        r.make_dir(id_)
        with open(r.path(id_, "record.json"), "w") as f:
            f.write(text)
    r.make_dir(6)                             # no record yet
    j = sample(7)
    r.make_dir(7)
    r.save(to_record(j))
    assert [x.id for x in r.load()] == [7]
    r.save(to_record(sample(8)))              # its directory is gone (removed): nothing written
    assert not os.path.exists(r.path(8))


def test_i10_2_ids_keep_increasing(tmp_path):
    r = Records(str(tmp_path))
    assert r.last_id() == 0
    for i in (1, 2, 3):
        r.make_dir(i)
    assert r.last_id() == 3
    r.remove(3)
    r.remove(1)
    assert not os.path.exists(r.path(3)) and r.last_id() == 3
    assert Records(str(tmp_path)).last_id() == 3


def test_i10_logs_and_metrics_replay_in_time_order(tmp_path):
    r = Records(str(tmp_path))
    r.make_dir(1)
    assert r.append_line(1, "first\nsecond", now=10.0) == [f"{stamp(10.0)} first", f"{stamp(10.0)} second"]
    r.append_metrics(1, {"step": 1, "loss": 2.0, "time": 11.0})
    r.append_line(1, "third", now=12.25)
    sizes = r.sizes(1)
    r.append_metrics(1, {"step": 2, "time": 13.0})        # after the sizes: not replayed
    events = r.read_events(1, sizes)
    assert events == [{"line": f"{stamp(10.0)} first"}, {"line": f"{stamp(10.0)} second"},
                      {"metrics": {"loss": 2.0, "step": 1, "time": 11.0}},
                      {"line": f"{stamp(12.25)} third"}]
    assert line_time(stamp(12.25) + " x") == 12.25 and line_time("garbage") == 0.0
    assert r.read_events(2, (100, 100)) == []              # no such job: nothing
    r.append_line(99, "gone")                              # a removed job's line: dropped quietly


def test_i10_from_record_refuses_nonsense():
    import pytest
    for bad in ([], {"id": "x", "kind": "train", "model": "m", "owner": 1, "state": "running"},
                {"id": 1, "kind": "train", "model": "m", "owner": 1, "state": "sleeping"}):
        with pytest.raises(ValueError):
            from_record(bad)


def test_i10_data_blobs_survive_recovery_and_cleanup(tmp_path):
    """Blobs a job record names (its data, its parent) are kept by the store's recovery and
    clean-ups until the record goes (``Store.extra_refs``)."""
    from llmosd.store.store import Store
    store = Store(str(tmp_path / "store"))
    data, other, orphan = (store.put_blob(b)[0] for b in (b"data", b"other", b"orphan"))
    keep = {data}
    store.extra_refs = lambda: frozenset(keep)
    assert store.recover()["orphan_blobs"] == 2
    assert store.has_blob(data) and not store.has_blob(other) and not store.has_blob(orphan)
    store.discard_unreferenced({data})             # e.g. an import of the same file ends
    assert store.has_blob(data)
    keep.clear()                                   # job_rm
    store.discard_unreferenced({data})
    assert not store.has_blob(data)


def test_i10_config_keys():
    import pytest
    from llmctl.errors import ConfigError
    from llmosd import config
    cfg, src = config.load("/dev/null", {}, environ={"LLMOSD_MAX_JOBS": "2", "LLMOSD_JOB_STOP_TIMEOUT_S": "5"})
    assert (cfg.max_jobs, cfg.job_stop_timeout_s) == (2, 5.0) and src["max_jobs"] == "env LLMOSD_MAX_JOBS"
    assert config.load("/dev/null", {}, environ={})[0].max_jobs == 1
    assert config.load("/dev/null", {}, environ={})[0].job_stop_timeout_s == 30.0
    for env in ({"LLMOSD_MAX_JOBS": "0"}, {"LLMOSD_JOB_STOP_TIMEOUT_S": "-1"},
                {"LLMOSD_JOB_STOP_TIMEOUT_S": "nan"}):
        with pytest.raises(ConfigError):
            config.load("/dev/null", {}, environ=env)
