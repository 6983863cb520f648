"""``llmctl train … --export slurm|torchrun DIR``: a training job to run on a cluster, no daemon.

DIR gets the data files in ``data/`` (the layout of the daemon's own run directories for
``nproc``), ``spec.json`` (the spec keys, and ``data``: {file name: sha256 digest}
so that the result's lineage names its sources), a README, and either ``run.sh`` (one
``torchrun`` command per node, chosen by NODE_RANK) or ``job.sbatch`` (``srun torchrun`` with
the c10d rendezvous on the first node).  Both run ``python -m llmosd.train.entry DIR``, whose
rank 0 writes a Hugging Face directory ``DIR/output`` that ``llmctl import`` takes back with
its lineage.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil

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


def torchrun_script(name: str, nnodes: int, nproc: int, endpoint: str) -> str:
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
# The result is written to output/ here: import it with  llmctl import THIS_DIR/output {printable(shlex.quote(name))}
set -euo pipefail
RUN_DIR="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
NODE_RANK="${{NODE_RANK:-${{1:-0}}}}"
RDZV_ENDPOINT="${{RDZV_ENDPOINT:-{endpoint}}}"
case "$NODE_RANK" in
{cases}
  *) echo "run.sh: NODE_RANK must be 0..{nnodes - 1}, got $NODE_RANK" >&2; exit 64 ;;
esac
"""


def sbatch_script(name: str, nnodes: int, nproc: int, run_dir: str, gpus: bool) -> str:
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
# The result is written to $RUN_DIR/output: import it with  llmctl import $RUN_DIR/output {printable(shlex.quote(name))}
set -euo pipefail
RUN_DIR=${{RUN_DIR:-{shlex.quote(run_dir)}}}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {nproc} \\
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head:{PORT}" \\
    -m {ENTRY} "$RUN_DIR"
"""


def readme(name: str, kind: str, nnodes: int, dest: str) -> str:
    run = ("sbatch job.sbatch" if kind == "slurm" else
           "./run.sh" if nnodes == 1 else "NODE_RANK=k ./run.sh   # on node k = 0.." + str(nnodes - 1))
    return (f"Training job for {name}, exported by llmctl ({kind}).\n\n"
            f"  data/       the data files\n"
            f"  spec.json   the training spec; 'data' names each data file and its digest\n"
            f"  {'job.sbatch' if kind == 'slurm' else 'run.sh    '}  runs python -m {ENTRY} on this directory\n\n"
            f"Run:     {run}\n"
            f"Import:  llmctl import {shlex.quote(os.path.join(dest, 'output'))} {shlex.quote(name)}"
            f"   (the model keeps its lineage: data digests, spec, final losses)\n")


def export_job(kind: str, dest: str, name: str, spec: dict, files: dict[str, str], *,
               nnodes: int = 1, endpoint: str | None = None) -> dict:
    """Write the job into ``dest`` (created; refused unless empty) and return {dir, files}.
    ``files`` is {name in the job: local path}, already checked to be readable."""
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
    data = {}
    try:
        os.makedirs(os.path.join(dest, "data"), exist_ok=True)
        for rel, path in files.items():
            data[rel] = sha256_file(path)[0]
            shutil.copyfile(path, os.path.join(dest, "data", rel))
        written = [f"data/{rel}" for rel in files]
        _write(dest, "spec.json", json.dumps({**spec, "data": data}, indent=2, sort_keys=True) + "\n")
        if kind == "torchrun":
            script = torchrun_script(name, nnodes, nproc, endpoint or f"localhost:{PORT}")
            _write(dest, "run.sh", script, mode=0o755)
        else:
            gpus = not str(spec.get("device") or "").startswith("cpu")
            _write(dest, "job.sbatch", sbatch_script(name, nnodes, nproc, dest, gpus), mode=0o755)
        _write(dest, "README", readme(name, kind, nnodes, dest))
    except OSError as e:
        raise OutputError(dest, e) from None
    written += ["spec.json", "run.sh" if kind == "torchrun" else "job.sbatch", "README"]
    return {"dir": dest, "kind": kind, "files": written, "data": data}


def _write(dest: str, rel: str, text: str, mode: int = 0o644) -> None:
    path = os.path.join(dest, rel)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
