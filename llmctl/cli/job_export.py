"""``llmctl train … --export slurm|torchrun DIR``: a training job to run on a cluster, no daemon.

DIR gets the data files in ``data/`` (the layout of the daemon's own run directories for
``nproc``), ``spec.json`` (the spec keys, and ``data``: {file name: sha256 digest}
so that the result's lineage names its sources), a README, and either ``run.sh`` (one
``torchrun`` command per node, chosen by NODE_RANK) or ``job.sbatch`` (``srun torchrun`` with
the c10d rendezvous on the first node).  Both run ``python -m llmosd.train.entry DIR``, whose
rank 0 writes a Hugging Face directory ``DIR/output`` that ``llmctl import`` takes back with
its lineage.

``finetune --export`` (``export_finetune``) writes the same layout plus ``parent/``: the base
model's meta.json (name, digest, tokenizer_type, add_bos, weights_digest, chat_template,
defaults), config.json, tokenizer.bin and model.safetensors, downloaded from the daemon's
store; validation files go to ``val_data/``, named by ``val_data`` in spec.json (the layout
of ``llmosd.train.distributed.write_run_dir``).  A LoRA run's output/ is a PEFT adapter
directory that ``llmctl import DIR/output NAME --base BASE`` takes back.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil

from ..errors import InvalidArgument
from ..export import download_blob
from ..upload import sha256_file
from .common import OutputError

ENTRY = "llmosd.train.entry"
PORT = 29500
KINDS = ("torchrun", "slurm")


def printable(name: str) -> str:
    """``name`` safe to put in a script's comment (no line breaks or control characters)."""
    return "".join(ch if ch.isprintable() else "?" for ch in name)


def rdzv_id(name: str) -> str:
    """A rendezvous id from the model name (letters, digits, - and _ only)."""
    return "llmosd-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "train")


def torchrun_script(name: str, nnodes: int, nproc: int, endpoint: str, imp: str | None = None) -> str:
    """run.sh: on each node, ``NODE_RANK=k ./run.sh`` (k = 0..nnodes-1; node 0 hosts the
    rendezvous at ``endpoint``, which RDZV_ENDPOINT overrides) runs that node's command."""
    cases = "\n".join(
        f"  {rank}) exec torchrun --nnodes {nnodes} --node-rank {rank} --nproc-per-node {nproc} \\\n"
        f"       --rdzv-backend c10d --rdzv-endpoint \"$RDZV_ENDPOINT\" --rdzv-id {rdzv_id(name)} \\\n"
        f"       -m {ENTRY} \"$RUN_DIR\" ;;"
        for rank in range(nnodes))
    return f"""#!/usr/bin/env bash
# Train {printable(name)} with torchrun: {nnodes} node(s) x {nproc} process(es), written by 'llmctl train --export torchrun'.
# Needs llmosd installed (python -m {ENTRY}) and this directory at the same path on every node.
# On node k (0..{nnodes - 1}):  NODE_RANK=k ./run.sh    (node 0 hosts the c10d rendezvous)
# The result is written to output/ here: import it with  {printable(imp or "llmctl import THIS_DIR/output " + shlex.quote(name))}
set -euo pipefail
RUN_DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
NODE_RANK="${{NODE_RANK:-${{1:-0}}}}"
RDZV_ENDPOINT="${{RDZV_ENDPOINT:-{endpoint}}}"
case "$NODE_RANK" in
{cases}
  *) echo "run.sh: NODE_RANK must be 0..{nnodes - 1}, got $NODE_RANK" >&2; exit 64 ;;
esac
"""


def sbatch_script(name: str, nnodes: int, nproc: int, run_dir: str, gpus: bool, imp: str | None = None) -> str:
    """job.sbatch: ``sbatch job.sbatch`` runs one ``srun torchrun`` task per node, meeting at
    the first node of the allocation (c10d rendezvous)."""
    gpu_line = f"#SBATCH --gpus-per-node={nproc}\n" if gpus else ""
    return f"""#!/bin/bash
#SBATCH --job-name={rdzv_id(name)}
#SBATCH --nodes={nnodes}
#SBATCH --ntasks-per-node=1
{gpu_line}#SBATCH --output=%x-%j.out
# Train {printable(name)} on a Slurm cluster: {nnodes} node(s) x {nproc} process(es), written by
# 'llmctl train --export slurm'.  Submit with:  sbatch job.sbatch   (sbatch --nodes=N overrides)
# Needs llmosd installed on every node and RUN_DIR on a file system they share.
# The result is written to $RUN_DIR/output: import it with  {printable(imp or "llmctl import $RUN_DIR/output " + shlex.quote(name))}
set -euo pipefail
RUN_DIR=${{RUN_DIR:-{shlex.quote(run_dir)}}}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {nproc} \\
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head:{PORT}" \\
    -m {ENTRY} "$RUN_DIR"
"""


def readme(name: str, kind: str, nnodes: int, dest: str, imp: str | None = None) -> str:
    run = ("sbatch job.sbatch" if kind == "slurm" else
           "./run.sh" if nnodes == 1 else "NODE_RANK=k ./run.sh   # on node k = 0.." + str(nnodes - 1))
    return (f"Training job for {name}, exported by llmctl ({kind}).\n\n"
            f"  data/       the data files\n"
            f"  spec.json   the training spec; 'data' names each data file and its digest\n"
            f"  {'job.sbatch' if kind == 'slurm' else 'run.sh    '}  runs python -m {ENTRY} on this directory\n\n"
            f"Run:     {run}\n"
            f"Import:  {imp or import_command(dest, name)}"
            f"   (the model keeps its lineage: data digests, spec, final losses)\n")


def import_command(dest: str, name: str, base: str | None = None) -> str:
    """The command that imports the run's output/ (a PEFT adapter of ``base`` if given)."""
    return (f"llmctl import {shlex.quote(os.path.join(dest, 'output'))} {shlex.quote(name)}"
            + (f" --base {shlex.quote(base)}" if base else ""))


def export_job(kind: str, dest: str, name: str, spec: dict, files: dict[str, str], *,
               nnodes: int = 1, endpoint: str | None = None, val: dict[str, str] | None = None,
               parent=None, imp: str | None = None) -> dict:
    """Write the job into ``dest`` (created; refused unless empty) and return {dir, files}.
    ``files`` (and ``val``, validation files) is {name in the job: local path}, already checked
    to be readable; ``parent(dir)``, if given, writes ``parent/`` into ``dir``; ``imp`` is the
    command that imports the result (default: ``llmctl import DIR/output NAME``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}")
    dest = os.path.abspath(dest)
    try:
        os.makedirs(dest, exist_ok=True)
        if os.listdir(dest):
            raise OutputError(dest, "the directory is not empty (give a new or empty one)")
    except OSError as e:
        raise OutputError(dest, e) from None
    nproc = int(spec.get("nproc") or 1)
    data, val_digests = {}, {}
    imp = imp or import_command(dest, name)
    try:
        written = []
        for sub, paths, digests in (("data", files, data), ("val_data", val or {}, val_digests)):
            if paths:
                os.makedirs(os.path.join(dest, sub), exist_ok=True)
            for rel, path in paths.items():
                digests[rel] = sha256_file(path)[0]
                shutil.copyfile(path, os.path.join(dest, sub, rel))
                written.append(f"{sub}/{rel}")
        if parent is not None:
            written += parent(dest)
        extra = {"val_data": val_digests} if val else {}
        _write(dest, "spec.json", json.dumps({**spec, "data": data, **extra}, indent=2, sort_keys=True) + "\n")
        if kind == "torchrun":
            script = torchrun_script(name, nnodes, nproc, endpoint or f"localhost:{PORT}", imp)
            _write(dest, "run.sh", script, mode=0o755)
        else:
            gpus = not str(spec.get("device") or "").startswith("cpu")
            _write(dest, "job.sbatch", sbatch_script(name, nnodes, nproc, dest, gpus, imp), mode=0o755)
        _write(dest, "README", readme(name, kind, nnodes, dest, imp))
    except OSError as e:
        raise OutputError(dest, e) from None
    written += ["spec.json", "run.sh" if kind == "torchrun" else "job.sbatch", "README"]
    return {"dir": dest, "kind": kind, "files": written, "data": data, "import": imp}


def export_finetune(client, kind: str, dest: str, base: str, name: str, spec: dict,
                    files: dict[str, str], val: dict[str, str] | None, *, nnodes: int = 1,
                    endpoint: str | None = None, progress=None) -> dict:
    """``export_job`` for fine-tuning ``base`` (a full model in ``client``'s store, whose files
    are downloaded into ``parent/``) into ``name``; the spec names its method (lora unless
    given) so that the run fine-tunes.  Returns export_job's dict and ``base`` (its full name)."""
    s = client.show(base)
    man = s["manifest"]
    if "weights" not in man:
        raise InvalidArgument(f"{s['model']} is an {man.get('kind') or 'adapter'}, not a full model: "
                              f"fine-tune a full model", hint=f"merge it first: llmctl merge {base} NEW-NAME")
    spec = {**spec, "method": spec.get("method") or "lora"}
    tok = man["tokenizer"]

    def parent(run_dir: str) -> list[str]:
        pdir = os.path.join(run_dir, "parent")
        os.makedirs(pdir, exist_ok=True)
        meta = {"name": s["model"], "digest": s["digest"], "tokenizer_type": tok["type"],
                "add_bos": tok.get("add_bos"), "weights_digest": man["weights"]["digest"],
                "chat_template": man.get("chat_template"), "defaults": dict(man.get("defaults") or {})}
        _write(run_dir, "parent/meta.json", json.dumps(meta, indent=1) + "\n")
        for fname, digest in (("config.json", man["config"]["digest"]), ("tokenizer.bin", tok["digest"]),
                              ("model.safetensors", man["weights"]["digest"])):
            download_blob(client, digest, pdir, fname, progress if fname.endswith(".safetensors") else None)
        return [f"parent/{f}" for f in ("meta.json", "config.json", "tokenizer.bin", "model.safetensors")]

    imp = import_command(os.path.abspath(dest), name, s["model"] if spec["method"] == "lora" else None)
    r = export_job(kind, dest, name, spec, files, nnodes=nnodes, endpoint=endpoint, val=val,
                   parent=parent, imp=imp)
    return {**r, "base": s["model"]}


def _write(dest: str, rel: str, text: str, mode: int = 0o644) -> None:
    path = os.path.join(dest, rel)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
