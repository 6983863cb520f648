"""The job half of the client: submit training and fine-tuning, evaluate, merge, list,
inspect, stop and follow jobs.

    with Client() as c:
        row = c.train("tiny-char", ["input.txt"], {"tokenizer": "char", "max_steps": 200})
        log = c.job_logs(row["job_id"], follow=True)
        for chunk in log:                 # {"line": str} | {"metrics": map} | {"row": row}
            print(chunk)
        print(log.result["job"]["state"])

A job row (``jobs``, ``job``, every ``--json``) has: job_id, kind, model, state, reason, step,
max_steps, loss, val_loss, tokens_per_s, eta_s, device, owner, priority, created, started,
finished, checkpoint_step, nproc, pid (unknown values are None).  ``JobsMixin`` is a base of
``Client``; it uses only the client's ``_call``, ``_start_stream``, ``_send_cancel`` and
``upload_file``.

Fine-tuning (protocol 1.6)::

    row = c.finetune("smollm2", "smollm2-qa", ["qa.jsonl"], {"method": "lora", "rank": 8, "epochs": 3})
    result = c.eval("smollm2-qa", ["qa-test.jsonl"])     # {"model", "examples", "metrics": {...}}
    c.merge("smollm2-qa", "smollm2-qa-merged")
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from .errors import InvalidArgument, LlmosdError
from .trainspec import EVAL_KEYS, FINETUNE_KEYS, check_spec, data_files, finetune_conflict
from .upload import RESEND

FT_NO_DATA = ("no data: give at least one --data FILE (JSONL: {\"prompt\", \"completion\"}, "
              "{\"messages\"}, {\"text\"} or {\"text\", \"label\"} per line)")

__all__ = ["JobsMixin", "JobLog", "FINISHED"]

FINISHED = ("succeeded", "failed", "cancelled")


class JobLog:
    """A ``job_logs`` stream: iterate for its chunk dicts, in order; once exhausted, ``result``
    is the end body ({"job": row}: the finished job when following, else the job as it is)."""

    def __init__(self, job_id: int, stream: Iterator[dict]):
        self.job_id, self._stream = job_id, stream
        self.result: dict | None = None

    def __iter__(self) -> "JobLog":
        return self

    def __next__(self) -> dict:
        if self.result is not None:
            raise StopIteration
        try:
            return next(self._stream)
        except StopIteration as stop:
            self.result = stop.value or {}
            raise StopIteration from None

    @property
    def row(self) -> dict | None:
        """The job's row from the end body (None until the stream is exhausted)."""
        return None if self.result is None else self.result.get("job")


class JobsMixin:
    """Job operations of ``Client`` (protocol 1.5; finetune, eval, merge: 1.6)."""

    def train(self, name: str, data_paths: Iterable[str], spec: dict, priority: int = 0,
              force: bool = False, progress: Callable[[dict], None] | None = None,
              preemptible: bool = False) -> dict:
        """Submit a training job for model ``name`` on the text/JSONL files ``data_paths``;
        returns its row.  ``spec`` holds the spec keys (llmctl.trainspec.SPEC_KEYS); if ``name``
        exists, training continues from it.  Every file is checked before anything is sent, then
        each is uploaded unless the store has its content (``progress`` hears {file, sent,
        size[, skipped]}).  The daemon checks spec and data and refuses (InvalidArgument) without
        queueing anything.  ``preemptible`` (1.7): a load that needs the job's memory pauses
        it (checkpointed); it resumes when the room comes back."""
        files = data_files(list(data_paths))
        spec = check_spec(dict(spec))
        body = {"name": name, "spec": spec}
        _job_flags(body, priority, force, preemptible)
        return self._submit("train", body, {"data": files}, progress)["job"]

    def finetune(self, base: str, name: str, data_paths: Iterable[str], spec: dict,
                 val_data: Iterable[str] | None = None, priority: int = 0, force: bool = False,
                 progress: Callable[[dict], None] | None = None, preemptible: bool = False) -> dict:
        """Submit a fine-tuning job of model ``base`` into ``name`` on the JSONL files
        ``data_paths`` (validation: ``val_data``, else a held-out split); returns its row.
        ``spec`` holds llmctl.trainspec.FINETUNE_KEYS (method full|lora|classify, rank, alpha,
        labels, epochs...); a combination that cannot work (labels without classify, epochs and
        max_steps...) is refused before anything is sent.  Uploads and ``preemptible`` as
        ``train``."""
        files = data_files(list(data_paths), FT_NO_DATA)
        val = data_files(list(val_data), FT_NO_DATA) if val_data else None
        spec = check_spec(dict(spec), keys=FINETUNE_KEYS)
        conflict = finetune_conflict(spec)
        if conflict:
            raise InvalidArgument(conflict, hint="see llmctl finetune --help")
        body = {"base": base, "name": name, "spec": spec}
        _job_flags(body, priority, force, preemptible)
        return self._submit("finetune", body, {"data": files, "val_data": val}, progress)["job"]

    def eval(self, model: str, data_paths: Iterable[str], spec: dict | None = None,  # noqa: A003
             progress: Callable[[dict], None] | None = None) -> dict:
        """Evaluate ``model`` on the JSONL files ``data_paths`` (the metrics fine-tuning
        reports, without training): a job the daemon runs while this waits; returns
        {"model", "examples", "metrics": {name: value}, "job"}.  ``spec``: EVAL_KEYS (metrics,
        eval_samples, ...).  ``progress`` hears uploads and the job's progress chunks.
        Ctrl-C (KeyboardInterrupt) cancels the job, then propagates."""
        files = data_files(list(data_paths), FT_NO_DATA)
        body = {"model": model}
        if spec:
            body["spec"] = check_spec(dict(spec), keys=EVAL_KEYS)
        for attempt in (1, 2):
            body["data"] = {rel: self.upload_file(p, progress) for rel, p in files.items()}
            try:
                return self._job_stream("eval", body, progress)
            except InvalidArgument as e:
                if attempt == 2 or RESEND not in str(e):
                    raise

    def eval_many(self, models: list[str], data_paths: Iterable[str], spec: dict | None = None,
                  progress: Callable[[dict], None] | None = None) -> list[dict]:
        """``eval`` of each of ``models`` on the same files, side by side: the files are
        uploaded once and every evaluation is asked for at once (each a job: the daemon keeps
        the data while any of them needs it); returns their end bodies in ``models``' order.
        ``progress`` hears uploads and each job's chunks with ``model`` added.  The first
        error (an unknown model...) or Ctrl-C cancels the others, then propagates."""
        files = data_files(list(data_paths), FT_NO_DATA)
        body: dict = {}
        if spec:
            body["spec"] = check_spec(dict(spec), keys=EVAL_KEYS)
        for attempt in (1, 2):
            body["data"] = {rel: self.upload_file(p, progress) for rel, p in files.items()}
            try:
                return self._eval_streams(list(models), body, progress)
            except InvalidArgument as e:
                if attempt == 2 or RESEND not in str(e):
                    raise

    def _eval_streams(self, models: list[str], body: dict, progress) -> list[dict]:
        """Send one ``eval`` per model, then read their replies as they come (one socket:
        ``_recv`` is given an id that equals any still open one)."""
        from . import protocol
        from .errors import from_wire
        if self._sock is None:
            self.connect()
        self._cancel_stale()
        rids = {}
        for i, model in enumerate(models):
            rid = next(self._ids)
            self._send(protocol.request(rid, "eval", {**body, "model": model}))
            rids[rid] = i
        results: list = [None] * len(models)
        open_ids = set(rids)
        try:
            while open_ids:
                msg = self._recv(AnyOf(open_ids), self.stream_idle_timeout)
                i, kind = rids[msg["id"]], msg["type"]
                if kind == "chunk":
                    if progress:
                        progress({**msg["body"], "model": models[i]})
                    continue
                open_ids.discard(msg["id"])
                if kind == "error":
                    raise from_wire(msg["body"])
                if kind != "end":
                    raise LlmosdError(f"unexpected reply type {kind!r} to eval")
                results[i] = msg["body"]
        except BaseException:            # Ctrl-C or an error: the others are not waited for
            for rid in open_ids:
                self._send_cancel(rid)
            raise
        return results

    def merge(self, adapter: str, name: str, force: bool = False,
              progress: Callable[[dict], None] | None = None) -> dict:
        """Write the adapter or classifier ``adapter`` merged into its base's weights as the
        standalone model ``name``; returns {model, digest, parameters, size, job}.  Ctrl-C
        cancels the job."""
        body = {"adapter": adapter, "name": name}
        if force:
            body["force"] = True
        return self._job_stream("merge", body, progress)

    def _submit(self, type_: str, body: dict, files: dict, progress) -> dict:
        """Upload each of ``files`` ({body key: {name: path}} or None) and send ``type_``.  A
        "send them after all" refusal (an import's source the daemon had said it had) is
        answered by sending the files and retrying once."""
        for attempt in (1, 2):
            for key, paths in files.items():
                if paths:
                    body[key] = {rel: self.upload_file(p, progress) for rel, p in paths.items()}
            try:
                return self._call(type_, body, timeout=self._work_timeout)
            except InvalidArgument as e:
                if attempt == 2 or RESEND not in str(e):
                    raise

    def _job_stream(self, type_: str, body: dict, progress, wait: float = 5.0) -> dict:
        """Run a streamed job request to its end body; chunks go to ``progress``.  On Ctrl-C
        the job is cancelled (its end or error awaited up to ``wait`` s) and the
        KeyboardInterrupt propagates."""
        rid, stream = self._start_stream(type_, body)
        try:
            while True:
                try:
                    chunk = next(stream)
                except StopIteration as stop:
                    return stop.value or {}
                if progress:
                    progress(chunk)
        except KeyboardInterrupt:
            self._send_cancel(rid)
            deadline, idle = time.monotonic() + wait, self.stream_idle_timeout
            self.stream_idle_timeout = wait            # a silent daemon cannot hold Ctrl-C up
            try:
                while time.monotonic() < deadline:
                    next(stream)
            except (StopIteration, LlmosdError):
                pass
            finally:
                self.stream_idle_timeout = idle
            raise

    def jobs(self, all: bool = False) -> list[dict]:       # noqa: A002 - the wire's name
        """Queued, running and paused jobs; with ``all``, the finished ones too."""
        return self._call("jobs", {"all": True} if all else {})["jobs"]

    def job(self, job_id: int) -> dict:
        """{"job": row, "spec": the spec it runs with, "data": {filename: digest}}."""
        return self._call("job", {"job": int(job_id)})

    def job_rm(self, job_id: int) -> dict:
        """Delete a finished job's record, metrics, log and checkpoints: {"removed": id}."""
        return self._call("job_rm", {"job": int(job_id)})

    def job_cancel(self, job_id: int) -> dict:
        """Cancel a job (queued, running or paused); returns its row (cancelled at once when it
        was not running, else as it stops)."""
        return self._call("job_cancel", {"job": int(job_id)})["job"]

    def job_pause(self, job_id: int) -> dict:
        """Ask a running job to checkpoint and stop (pausing, then paused); returns its row."""
        return self._call("job_pause", {"job": int(job_id)})["job"]

    def job_resume(self, job_id: int) -> dict:
        """Queue a paused job again (it continues from its checkpoint); returns its row."""
        return self._call("job_resume", {"job": int(job_id)})["job"]

    def job_logs(self, job_id: int, follow: bool = False) -> JobLog:
        """The job's log lines, metrics and state changes as a ``JobLog``: what is stored so far,
        and with ``follow`` what comes next until the job finishes.  Leaving a followed stream
        early (Ctrl-C) detaches: the job goes on."""
        body = {"job": int(job_id)}
        if follow:
            body["follow"] = True
        _, stream = self._start_stream("job_logs", body)
        return JobLog(int(job_id), stream)


class AnyOf:
    """A request id equal to each of ``ids`` (and unequal to any other): ``Client._recv``
    keeps a reply whose ``msg["id"] != rid`` is false, so several streams read on one socket."""

    def __init__(self, ids):
        self.ids = frozenset(ids)

    def __eq__(self, other) -> bool:
        return other in self.ids

    def __ne__(self, other) -> bool:
        return other not in self.ids

    __hash__ = None


def _job_flags(body: dict, priority: int, force: bool, preemptible: bool) -> None:
    """Add the submit flags that differ from the daemon's defaults (an older daemon then
    never sees a field it does not know)."""
    if priority:
        body["priority"] = int(priority)
    if force:
        body["force"] = True
    if preemptible:
        body["preemptible"] = True
