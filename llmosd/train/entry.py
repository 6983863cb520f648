"""``python -m llmosd.train.entry RUN_DIR``: one rank of a training run, torchrun-compatible.

It reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
RUN_DIR: ``spec.json`` (the train spec; ``data`` names the data files, a list or a
``{file: digest}`` mapping), the data files (in RUN_DIR or RUN_DIR/data/) and, to continue a
model, ``parent/`` (meta.json, config.json, tokenizer.bin, model.safetensors).  Checkpoints go to
``$LLMOSD_CHECKPOINT_DIR`` or RUN_DIR/checkpoints/; running the same command again resumes.

A spec with ``method`` is a fine-tune (``train.finetune.FineTuner``): ``parent/`` is its base
(meta.json also carries the chat template) and ``val_data`` its validation files (in
RUN_DIR/val_data/).

Launched by the daemon's worker (``LLMOSD_RELAY=1``), rank 0 reports as JSON lines on stdout
and the worker publishes the result from the final checkpoint.  Run by hand, torchrun or srun,
rank 0 prints plain progress lines and at the end writes RUN_DIR/output/: a Hugging Face
directory with ``llmosd_lineage.json``, which ``llmctl import RUN_DIR/output NAME`` brings back
with its lineage (a LoRA fine-tune: a PEFT adapter directory, imported with ``--base``).  SIGUSR1 or SIGTERM: checkpoint and stop (exit status 75; run again to resume).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
import traceback

EXIT_USAGE, EXIT_SOFTWARE = 64, 70


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RankCtl:
    """The ``ctl`` of a rank: rank 0 relays JSON lines (under the worker) or prints plain lines;
    the other ranks say nothing.  A signal asks for a pause (checkpoint, then stop)."""

    job_id = None

    def __init__(self, rank: int, relay: bool):
        self.rank, self.relay, self.want, self.max_steps = rank, relay, None, None

    def _out(self, event: dict, plain: str | None) -> None:
        if self.rank == 0 and (self.relay or plain is not None):
            print(json.dumps(event) if self.relay else plain, flush=True)

    def progress(self, p: dict) -> None:
        self._out({"progress": p}, p.get("message"))

    __call__ = progress

    def log(self, line: str) -> None:
        self._out({"log": line}, line)

    def metrics(self, m: dict) -> None:
        val = f"  val {m['val_loss']:.4f}" if m.get("val_loss") is not None else ""
        self._out({"metrics": m}, f"step {m['step']:,}/{self.max_steps:,}  loss {m['loss']:.4f}{val}  "
                                  f"lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tok/s  "
                                  f"eta {_duration(m['eta_s'])}")

    def checkpoint_saved(self, step: int) -> None:
        self._out({"checkpoint": step}, None)

    def stop_requested(self):
        return self.want

    def on_signal(self, signum, frame) -> None:
        self.want = "pause"


def read_data(run_dir: str, names, sub: str = "data") -> tuple[dict, dict]:
    """({file: digest}, {file: bytes}) of the data files ``spec.json`` names (the digests are
    computed: they are what the lineage records); looked for in RUN_DIR/``sub`` first
    (``val_data``: a fine-tune's validation files), then RUN_DIR and RUN_DIR/data."""
    if isinstance(names, dict):
        names = list(names)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"spec.json must name the data files: \"{sub}\": [\"file.txt\", ...]")
    data = {}
    for name in names:
        where = [os.path.join(run_dir, sub, name), os.path.join(run_dir, name),
                 os.path.join(run_dir, "data", name)]
        found = next((p for p in where if "/" not in name and os.path.isfile(p)), None)
        if found is None:
            raise ValueError(f"{sub} file {name} is not in {run_dir}/{sub} or {run_dir}")
        with open(found, "rb") as f:
            data[name] = f.read()
    return {n: sha(d) for n, d in data.items()}, data


def read_parent(run_dir: str) -> dict | None:
    """The model training continues from (RUN_DIR/parent/), as ``pretrain.load_parent`` gives."""
    pdir = os.path.join(run_dir, "parent")
    if not os.path.isdir(pdir):
        return None
    with open(os.path.join(pdir, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(pdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(pdir, "tokenizer.bin"), "rb") as f:
        tok = f.read()
    out = {"name": meta.get("name"), "digest": meta.get("digest"), "config": config,
           "tokenizer": tok, "tokenizer_type": meta["tokenizer_type"], "add_bos": meta.get("add_bos"),
           "weights": os.path.join(pdir, "model.safetensors")}
    if "weights_digest" in meta:           # a fine-tune's checkpoints record their base's
        out["weights_digest"] = meta["weights_digest"]
    if "chat_template" in meta or "defaults" in meta:
        out.update(chat_template=meta.get("chat_template"), defaults=meta.get("defaults"))
    return out


def write_output(out_dir: str, s: dict, sources: dict, parent: dict | None, ck: dict,
                 lineage: dict | None = None) -> None:
    """The trained model as a Hugging Face directory (``formats.hf_export``'s files) with
    ``llmosd_lineage.json`` (``lineage``, default a train lineage); written beside, then
    renamed into place."""
    from safetensors.torch import save as save_safetensors

    from llmosd.formats.hf_export import hf_files
    from llmosd.store.manifest import train_lineage
    from llmosd.train.pretrain import model_weights
    weights = save_safetensors(model_weights(ck), metadata={"format": "pt"})
    tok = {"type": ck["tokenizer_type"], "digest": sha(ck["tokenizer"]), "size": len(ck["tokenizer"]),
           "add_bos": ck["add_bos"]}
    manifest = {"tokenizer": tok, "weights": {"digest": sha(weights), "size": len(weights), "dtype": "float32"}}
    if parent and parent.get("chat_template") is not None:
        manifest["chat_template"] = parent["chat_template"]
    blobs = {tok["digest"]: ck["tokenizer"], sha(weights): weights}
    if lineage is None:
        lineage = train_lineage(s, sources, parent, None, ck["final"]).to_dict()
    files = hf_files(manifest, ck["config"], ck["tokenizer"])
    files.append({"name": "llmosd_lineage.json", "data": (json.dumps(lineage, indent=2) + "\n").encode()})
    _write_dir(out_dir, files, blobs)


def write_adapter_output(out_dir: str, s: dict, sources: dict, parent: dict, ck: dict) -> None:
    """A LoRA fine-tune as a PEFT adapter directory (adapter_config.json,
    adapter_model.safetensors) with ``llmosd_lineage.json``, which ``llmctl import DIR NAME
    --base BASE`` takes back; a classifier adds its head (``score.safetensors``, labels in
    the lineage)."""
    from safetensors.torch import save as save_safetensors

    from llmosd.formats.peft import adapter_config
    from llmosd.store.manifest import finetune_lineage
    from llmosd.train.finetune import lora_config, split_trained
    tensors, head = split_trained(ck["model"])
    lineage = finetune_lineage(s, sources, parent, None, ck["final"]).to_dict()
    files = [{"name": "llmosd_lineage.json", "data": (json.dumps(lineage, indent=2) + "\n").encode()}]
    lcfg = lora_config(s)
    if lcfg is not None:
        man = {"adapter": lcfg.to_dict(), "base": {"model": parent.get("name")}}
        conf = adapter_config(man, parent.get("name") or "")
        files += [{"name": "adapter_config.json", "data": (json.dumps(conf, indent=2) + "\n").encode()},
                  {"name": "adapter_model.safetensors",
                   "data": save_safetensors(tensors, metadata={"format": "pt"})}]
    if head is not None:
        files.append({"name": "score.safetensors",
                      "data": save_safetensors({"score.weight": head}, metadata={"format": "pt"})})
    _write_dir(out_dir, files, {})


def _write_dir(out_dir: str, files: list[dict], blobs: dict) -> None:
    """``files`` ({"name", "data"} or {"name", "digest"} of ``blobs``) into ``out_dir``,
    written beside it, then renamed into place."""
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in files:
        with open(os.path.join(tmp, f["name"]), "wb") as out:
            out.write(f["data"] if "data" in f else blobs[f["digest"]])
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)


def prepare(run_dir: str, spec: dict, parent: dict | None):
    """(make(ckpt_dir, ctl, dist) -> the trainer, the checked spec, {file: digest} of the data,
    finish(out_dir, ck) -> the import command's extra flags, having written the output) of a
    training run, or of a fine-tune when the spec has ``method``."""
    from llmosd.train.pretrain import Trainer, user_spec
    from llmosd.train.spec import check_train_spec
    sources, data = read_data(run_dir, spec.get("data"))
    if "method" not in spec:
        s = check_train_spec({**user_spec(spec), "data": sources}, data, parent)

        def finish(out, ck):
            write_output(out, s, sources, parent, ck)
            return ""
        return (lambda d, ctl, group: Trainer(s, data, parent, d, ctl, group)), s, sources, finish
    from llmosd.store.manifest import finetune_lineage
    from llmosd.train.finetune import FineTuner, base_facts
    from llmosd.train.ftspec import check_finetune_spec
    if parent is None:
        raise ValueError(f"a fine-tune needs its base model in {run_dir}/parent (meta.json, "
                         "config.json, tokenizer.bin, model.safetensors)")
    vsources, val = read_data(run_dir, spec["val_data"], "val_data") if spec.get("val_data") else ({}, None)
    # written by hand or by the client (checked or not: the check is idempotent)
    given = {**user_spec(spec), "data": sources, **({"val_data": vsources} if vsources else {})}
    s = check_finetune_spec(given, data, val, base_facts(parent, parent["config"]))

    def finish(out, ck):
        if s["method"] == "full":
            lineage = finetune_lineage(s, sources, parent, None, ck["final"]).to_dict()
            write_output(out, s, sources, parent, ck, lineage)
            return ""
        write_adapter_output(out, s, sources, parent, ck)
        return f" --base {parent.get('name') or 'BASE'}"
    return ((lambda d, ctl, group: FineTuner(s, data, parent, d, ctl, group, val_data=val)),
            s, sources, finish)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llmosd.train.entry RUN_DIR", file=sys.stderr)
        return EXIT_USAGE
    import torch

    from llmosd.train.distributed import ERROR_PREFIX, EXIT_INVALID, EXIT_PAUSED, Group, Solo
    from llmosd.train.pretrain import Paused, pick_device
    env = os.environ
    run_dir = os.path.abspath(args[0])
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    local, relay = int(env.get("LOCAL_RANK", "0")), env.get("LLMOSD_RELAY") == "1"
    if env.get("LLMOSD_TRAIN_THREADS"):
        torch.set_num_threads(int(env["LLMOSD_TRAIN_THREADS"]))
    ctl, group = RankCtl(rank, relay), None
    signal.signal(signal.SIGUSR1, ctl.on_signal)
    signal.signal(signal.SIGTERM, ctl.on_signal)
    try:
        ckpt_dir = env.get("LLMOSD_CHECKPOINT_DIR") or os.path.join(run_dir, "checkpoints")
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(os.path.join(run_dir, "spec.json")) as f:
            spec = json.load(f)
        if not isinstance(spec, dict):
            raise ValueError("spec.json must hold a JSON object")
        parent = read_parent(run_dir)
        make, s, sources, finish = prepare(run_dir, spec, parent)
        ctl.max_steps = s["max_steps"]
        group = Group(rank, world, local, pick_device(s["device"], local)) if world > 1 else Solo()
        t0 = time.time()
        ck = make(ckpt_dir, ctl, group).fit()
        if rank == 0 and not relay:
            out = os.path.join(run_dir, "output")
            how = finish(out, ck)
            ctl.log(f"done in {_duration(time.time() - t0)}: {out} "
                    f"(bring it in with: llmctl import {out} NAME{how})")
        return 0
    except Paused:
        ctl.log("run the same command again to resume")
        return EXIT_PAUSED
    except ValueError as e:
        print(ERROR_PREFIX + str(e).replace("\n", " "), file=sys.stderr, flush=True)
        return EXIT_INVALID
    except Exception:
        traceback.print_exc()
        return EXIT_SOFTWARE
    finally:
        if group is not None:
            group.close()


if __name__ == "__main__":
    sys.exit(main())
