"""Handlers of fine-tuning (protocol 1.6): finetune, eval and merge, a mixin of ``ops.jobs.JobOps``.

``finetune`` is a training job like ``train`` (answered with its row, resumed after restarts);
``eval`` is a streamed job whose result is a metrics map (nothing is published); ``merge`` is a
streamed job like ``create`` that makes a standalone model from an adapter and its base.  The
job functions run in worker processes and are named, never imported here (they import torch).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Callable

from llmctl.errors import Cancelled, Internal, InvalidArgument, LlmosdError
from llmosd import access
from llmosd.ops.store import write_error
from llmosd.server import Ctx
from llmosd.store.bases import resolve_base
from llmosd.store.index import blob_digests
from llmosd.store.manifest import base_of, kind_of
from llmosd.store.store import canonical

log = logging.getLogger("llmosd.ops")

FINETUNE = "llmosd.train.finetune:run"
EVAL = "llmosd.train.metrics:run_eval"
MERGE = "llmosd.train.merge:run"
IMPORT_ADAPTER = "llmosd.formats.peft:import_adapter"
ENTRY_KEYS = ("config", "tokenizer", "weights", "chat_template", "defaults")


def base_entries(canon: str, man: dict, digest: str) -> dict:
    """What a worker needs of a base model (``_base`` / ``_parent`` of its spec): its name,
    manifest digest and the manifest's entries."""
    return {"name": canon, "digest": digest, **{k: man[k] for k in ENTRY_KEYS if k in man}}


CHAR_VOCAB = 512          # a char tokenizer's vocabulary, for estimates (the data decides it)


def job_estimate(full: dict, cfg: dict | None) -> int | None:
    """The bytes a train or finetune job with checked spec ``full`` needs on its device, all
    its ranks together, before any correction (``mem.estimate.estimate_job``): of model config
    ``cfg`` (a dict: the parent's or base's), or of the new model the spec describes.  None
    when the config lacks what an estimate needs (the job then reserves nothing)."""
    from llmosd.mem.estimate import estimate_job
    from llmosd.train.spec import default_hidden
    try:
        if cfg is None:
            cfg = {"hidden_size": full["dim"], "intermediate_size": default_hidden(full["dim"]),
                   "num_hidden_layers": full["layers"], "num_attention_heads": full["heads"],
                   "num_key_value_heads": full.get("kv_heads") or full["heads"],
                   "vocab_size": full.get("vocab_size") or CHAR_VOCAB}
        return estimate_job(cfg, full) * max(1, int(full.get("nproc") or 1))
    except (KeyError, TypeError, ValueError):
        return None


def eval_record(result: dict) -> dict:
    """What an eval job's record keeps of its result (as its last metrics map): the metrics,
    the number of examples and, for the job row's LOSS column, the loss when measured."""
    metrics = dict(result.get("metrics") or {})
    out = {"metrics": metrics, "examples": result.get("examples")}
    if isinstance(metrics.get("loss"), (int, float)):
        out["loss"] = metrics["loss"]
    return out


def check_full_model(canon: str, man: dict) -> None:
    """InvalidArgument unless ``man`` is a model with its own weights and no head: only such a
    model can be the base of an adapter (an adapter of an adapter would need both applied)."""
    base = base_of(man)
    kind = kind_of(man)
    if base is not None:
        raise InvalidArgument(
            f"{canon} is {'an adapter' if kind == 'adapter' else 'a classifier'} on {base['model']}; "
            "it cannot be the base of another model",
            hint=f"use {base['model']} as the base, or merge {canon} into a standalone model first "
                 f"(llmctl merge {canon} NAME) and use that")
    if kind != "model":
        raise InvalidArgument(f"{canon} is a classifier (a model with a classification head); "
                              "it cannot be the base of another model",
                              hint="use the model it was fine-tuned from as the base")
    if not isinstance(man.get("weights"), dict):
        raise InvalidArgument(f"{canon} has no weights of its own; it cannot be a base")


def refusal(error: Exception, what: str) -> LlmosdError:
    """The error a client gets when checking a submission (on its thread) failed: bad input
    (ValueError) is invalid_argument, a refusal stays as it is, anything else is internal."""
    if isinstance(error, ValueError):
        return InvalidArgument(str(error))
    if isinstance(error, LlmosdError):
        return error
    return Internal(f"checking the {what} spec failed: {error!r}")


def off_loop(post: Callable, name: str, work: Callable[[], object],
             then: Callable[[object, Exception | None], None]) -> None:
    """Run ``work`` on a short thread (it may read blobs, import torch); ``then(result,
    error)`` runs on the loop through ``post``."""
    def run():
        try:
            result, error = work(), None
        except Exception as e:        # noqa: BLE001 - handed to the loop
            result, error = None, e
        post(then, result, error)
    threading.Thread(target=run, name=name, daemon=True).start()


class FinetuneOps:
    """``op_finetune``, ``op_eval``, ``op_merge`` (mixed into ``JobOps``: its ``store``,
    ``manager``, ``jobs`` and helpers ``_check_names``, ``_check_uploaded``,
    ``_check_target``, ``_check_no_job``, ``_hooks``, ``_job``, ``_refusal``, ``_settle``).
    ``cfg``: the daemon's config (admin_group, quotas), set by whoever builds the ops."""

    cfg = None

    def _owner(self, man: dict) -> int | None:
        """``man``'s owner for access checks (``access.model_owner``); a model published
        before owners were recorded has none, and anyone may act on it."""
        return access.model_owner(man, legacy=False)

    def _check_job_quota(self, ctx: Ctx) -> None:
        """PermissionDenied with the numbers when ``ctx``'s uid already has its ``max_jobs``
        jobs not finished (queued, running, pausing, paused)."""
        if access.quota(ctx.uid, "max_jobs", self.cfg) is None:
            return
        jobs = getattr(self.jobs, "jobs", None) or {}
        used = sum(1 for j in jobs.values() if j.owner == ctx.uid and not j.is_finished())
        err = access.over_quota(ctx.uid, "max_jobs", used, 1, self.cfg)
        if err is not None:
            raise err

    # -- what the checking threads read ---------------------------------------------------
    def _context(self, man: dict) -> int | None:
        cfg = json.loads(self.store.read_blob(man["config"]["digest"]))
        return cfg.get("max_position_embeddings")

    def _has_template(self, man: dict) -> bool:
        """Whether the model renders chats: a template in the manifest, or in its
        Hugging Face tokenizer bundle (as the loader finds it)."""
        if man.get("chat_template"):
            return True
        tok = man.get("tokenizer") or {}
        if tok.get("type") != "hf-tokenizers":
            return False
        try:
            return bool(json.loads(self.store.read_blob(tok["digest"])).get("chat_template"))
        except (ValueError, AttributeError):
            return False

    def _read_data(self, data: dict) -> dict:
        return {rel: self.store.read_blob(d) for rel, d in data.items()}

    def _discard(self, digests: set) -> None:
        """The uploaded data of a submission that started no job: deleted unless a manifest or
        a job names them (as a refused import's files)."""
        # At once, on the loop (as a refused import's files): deleted later on the writer, a
        # blob could vanish after a retry's 'upload' was told the daemon has it.
        if digests:
            try:
                self.store.discard_unreferenced(set(digests))
            except OSError:
                log.exception("removing the refused upload(s) %s failed", ", ".join(sorted(digests)))

    # -- finetune -----------------------------------------------------------------------------
    def op_finetune(self, ctx: Ctx) -> None:
        """Check the spec against the data and the base (off the loop), then queue a finetune
        job and answer with its row.  The base must be a model with its own weights.  The
        result (a model, an adapter or a classifier) is published as ``name``, replacing a
        model only with ``force``.  The data and the base's blobs stay in the store while the
        job's record exists; refused, the data goes (unless something else names it)."""
        b = ctx.body
        canon, force = canonical(b["name"]), b.get("force", False)
        data, val, spec = dict(b["data"]), dict(b.get("val_data") or {}), dict(b["spec"])
        if not data:
            raise InvalidArgument("finetune needs at least one data file", hint="give --data FILE")
        self._check_names("data", data)
        self._check_names("val_data", val)
        uploads = set(data.values()) | set(val.values())
        try:
            self._check_uploaded("data", data, "fine-tuning needs their content")
            self._check_uploaded("val_data", val, "fine-tuning needs their content")
            bcanon, bman, bdigest = self.store.find(b["base"])
            check_full_model(bcanon, bman)
            if bcanon == canon:
                raise InvalidArgument(f"the fine-tuned model needs a name of its own, not its base's ({canon})",
                                      hint="choose another NAME")
            self._check_target(canon, force, ctx.uid)
            self._check_job_quota(ctx)
        except LlmosdError:
            self._discard(uploads)
            raise
        base = base_entries(bcanon, bman, bdigest)
        refs = uploads | blob_digests(bman)
        key = object()
        self.jobs.reserve(key, refs)              # nothing may remove them while we check

        def check():                              # on a short thread: reads the data
            from llmosd.models.lora import TARGETS            # torch: on this thread only
            from llmosd.train.ftspec import check_finetune_spec
            seen = {"name": bcanon, "context": self._context(bman), "has_template": self._has_template(bman),
                    "targets_known": TARGETS}
            full = check_finetune_spec(spec, self._read_data(data), self._read_data(val) if val else None, seen)
            from llmosd.train.distributed import check_nproc     # what the devices allow (torch)
            from llmosd.train.pretrain import pick_device
            pick_device(full.get("device", "auto"))
            check_nproc(full)
            return full, job_estimate(full, json.loads(self.store.read_blob(bman["config"]["digest"])))

        def checked(result, error):               # on the loop
            job = None
            try:
                if error is not None:
                    raise refusal(error, "finetune")
                full, estimate = result
                self._check_target(canon, force, ctx.uid)  # again: things may have changed meanwhile
                self.store.get(bcanon)            # the base is still there (ModelNotFound)
                device = full.get("device")
                if device in (None, "auto"):
                    device = str(self.manager.device)
                wspec = {**full, "device": device, "data": data, "_force": force, "_base": base}
                if val:
                    wspec["val_data"] = val
                job = self.jobs.start("finetune", canon, FINETUNE, wspec, ctx.uid,
                                      *self._hooks("finetune", canon, force),
                                      data=data, refs=refs, priority=b.get("priority", 0), device=device,
                                      preemptible=b.get("preemptible", False), mem_estimate=estimate)
            except Exception as e:     # noqa: BLE001 - a refusal, or the disk (the job's directory)
                ctx.error(write_error(f"queueing the fine-tuning of {canon}", e))
            finally:
                self.jobs.release(key)
                if job is None:                   # refused: its uploads are not kept
                    self._discard(uploads)
            if job is not None:
                log.info("finetune %s on %s by uid %s: job %d queued", canon, bcanon, ctx.uid, job.id)
                ctx.ok({"job": job.row()})
        off_loop(self.jobs.post, "finetune-check", check, checked)

    # -- eval ---------------------------------------------------------------------------------
    def op_eval(self, ctx: Ctx) -> None:
        """Evaluate a stored model (a model, an adapter or a classifier) on data: a streamed
        job whose end carries the metrics.  Nothing is published; cancelling the request (or
        the client leaving) cancels the job; it is not resumed after a restart.  The data
        blobs go once it has ended, or when it is refused or cancelled before it starts
        (unless something else uses them)."""
        b = ctx.body
        data, spec = dict(b["data"]), dict(b.get("spec") or {})
        if not data:
            raise InvalidArgument("eval needs at least one data file", hint="give --data FILE")
        self._check_names("data", data)
        uploads = set(data.values())
        try:
            canon, man, _ = self.store.find(b["model"])
            self._check_uploaded("data", data, "evaluating needs their content")
            base, refs = None, uploads | blob_digests(man)
            if base_of(man) is not None:          # gone or changed: refused here, as load is
                bcanon, bman, bdigest = resolve_base(self.store, canon, man)
                base, refs = base_entries(bcanon, bman, bdigest), refs | blob_digests(bman)
        except LlmosdError:
            self._discard(uploads)
            raise
        head = man.get("head") if isinstance(man.get("head"), dict) else {}
        key, job_ref = object(), []
        self.jobs.reserve(key, refs)

        def cancel(reason: str) -> None:
            if job_ref:
                self.jobs.cancel(job_ref[0].id)   # its on_done ends the stream
            else:                                 # still being checked: nothing runs yet
                stream.error(Cancelled(f"eval of {canon} was cancelled"))
        stream = ctx.stream(cancel)

        def check():
            from llmosd.train.ftspec import check_eval_spec
            seen = {"kind": kind_of(man), "labels": head.get("labels"),
                    "has_template": self._has_template(man), "context": self._context(man)}
            full = check_eval_spec(spec, self._read_data(data), seen)
            from llmosd.train.pretrain import pick_device
            pick_device(full.get("device", "auto"))
            return full

        def checked(full, error):
            try:
                if stream.closed:                 # the client went away meanwhile
                    return
                if error is not None:
                    stream.error(refusal(error, "eval"))
                    return
                device = full.get("device")
                if device in (None, "auto"):
                    device = str(self.manager.device)
                wspec = {**full, "device": device, "model": canon, "data": data, "_model": man,
                         "_base": base}
                progress, done = self._eval_hooks(canon, data, stream)
                job_ref.append(self.jobs.start("eval", canon, EVAL, wspec, ctx.uid, progress, done,
                                               data=data, refs=refs, device=device))
                if job_ref[0].state.value == "queued":
                    stream.chunk({"stage": "queued", "message": f"job {job_ref[0].id} is queued: "
                                  "other jobs use the device (max_jobs)"})
            except Exception as e:     # noqa: BLE001 - the disk (the job's directory)
                stream.error(write_error(f"queueing the evaluation of {canon}", e))
            finally:
                self.jobs.release(key)
                if not job_ref:                   # no job: its data is not kept
                    self._discard(uploads)
        off_loop(self.jobs.post, "eval-check", check, checked)

    def _eval_hooks(self, canon: str, data: dict, stream) -> tuple[Callable, Callable]:
        """(on_progress, on_done) of an eval job: progress to the client; at the end the
        metrics (or one error), the job settled and its data released."""
        def progress(job, p):
            job.progress = p
            stream.chunk(p)

        def done(job, result, error):             # on the loop: the worker has ended
            bad = self._refusal("eval", canon, job, result, error)
            if bad is None and not isinstance(result.get("metrics"), dict):
                bad = Internal(f"eval of {canon}: the job returned no metrics")
            if bad is None:                       # kept in its record: jobs show, jobs --all
                job.metrics = eval_record(result)
            self._settle(job, bad.message if bad else None)
            self.jobs.drop_refs(job)
            self._discard(set(data.values()))
            if bad is not None:
                stream.error(bad)
                return
            metrics = result["metrics"]
            self.jobs.note(job, "metrics: " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float)
                                                        else f"{k} {v}" for k, v in metrics.items()))
            end = {"model": canon, "examples": result.get("examples"), "metrics": metrics, "job": job.id}
            if result.get("predictions_file"):
                end["predictions_file"] = result["predictions_file"]
            stream.end(end)
        return progress, done

    # -- merge --------------------------------------------------------------------------------
    def op_merge(self, ctx: Ctx) -> None:
        """Merge an adapter (or a classifier made on a base) into its base's weights: a
        streamed job like create that publishes a standalone model ``name``."""
        b = ctx.body
        acanon, aman, adigest = self.store.find(b["adapter"])
        if base_of(aman) is None:
            raise InvalidArgument(f"{acanon} is not an adapter: it has its own weights",
                                  hint="merge takes an adapter or a classifier made on a base model "
                                       "('llmctl ls' shows each one's BASE)")
        bcanon, bman, bdigest = resolve_base(self.store, acanon, aman)
        spec = {"name": b["name"], "force": b.get("force", False), "_adapter": aman,
                "_adapter_name": acanon, "_adapter_digest": adigest,
                "_base": base_entries(bcanon, bman, bdigest)}
        self._job(ctx, "merge", MERGE, spec, refs=blob_digests(aman) | blob_digests(bman))
