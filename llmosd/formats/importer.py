"""The ``import`` job: uploaded checkpoint files -> a native store model.  Runs in a job worker.

It dispatches on the format (``hf``: a Hugging Face directory, read by ``formats.hf``;
``gguf``: one GGUF file, read by ``formats.gguf``), writes the weights (safetensors, Hugging
Face tensor names), config and tokenizer as blobs, and returns the manifest to publish, with
its lineage: the format, the dtype asked for (auto keeps a GGUF's quantized blocks; int8/int4
quantize, see ``models.quant``), and the files' names and digests (``sources``:
a re-import of the same files is then a copy).  The readers, and torch, are imported when the
job runs: the daemon names ``import_model`` without importing them.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

from llmosd.store.manifest import Blob, Manifest, Serving, imported_lineage
from llmosd.store.store import Store


def import_model(spec: dict, store_root: str, progress: Callable[[dict], None]) -> dict:
    """Job entry point: convert the uploaded files of ``spec`` and return the new manifest.
    Raises CheckpointError (a ValueError: invalid input) naming what cannot be imported."""
    from safetensors.torch import save_file

    from llmosd.models import quant
    from llmosd.models.loader import DTYPES

    store = Store(store_root)
    files, fmt = spec["files"], spec.get("format", "hf")
    dtype = spec.get("dtype") or "auto"
    if fmt == "gguf":
        from llmosd.formats.gguf import import_gguf
        (rel, digest), = files.items()
        cfg, sd, tok, defaults = import_gguf(store, store.blob_path(digest), progress, dtype)
        sd = check_stored(cfg, sd, "the GGUF metadata")
    else:
        from llmosd.formats.hf import read_hf
        cfg, sd, tok, defaults = read_hf(store, files, progress)
        if dtype in DTYPES:
            want = DTYPES[dtype]
            sd = {k: v.to(want) if v.is_floating_point() else v for k, v in sd.items()}
        elif dtype in ("int8", "int4"):
            progress({"stage": "weights", "message": f"quantizing to {dtype}"})
            sd = quant.quantize_state_dict(sd, 8 if dtype == "int8" else 4)
    progress({"stage": "store", "message": f"writing {len(sd)} tensors"})
    fd, tmp = tempfile.mkstemp(dir=store.tmp, prefix="import-")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            weights = Blob(*store.put_blob(f))
    finally:
        os.unlink(tmp)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    config = Blob(*store.put_blob(json.dumps(cfg.to_dict(), sort_keys=True, indent=1).encode()))
    tokenizer = Blob(*store.put_blob(tok["data"]))
    info = tok.get("info") or {}
    exported = None
    if fmt != "gguf":                   # an exported training run keeps its lineage
        from llmosd.formats.hf import hf_lineage
        exported = hf_lineage(store, files)
    lineage = imported_lineage(exported, fmt, files, dtype)
    man = Manifest(parameters=quant.parameter_count(sd), config=config,
                    tokenizer=tokenizer, tokenizer_type=tok["type"], vocab_size=cfg.vocab_size,
                    weights=weights, weights_dtype=",".join(dtypes), lineage=lineage,
                    add_bos=bool(info.get("add_bos_token", True)),
                    serving=Serving(info.get("chat_template"), defaults)).to_dict()
    kinds = quant.stored_summary(sd)
    if kinds:
        man["weights"]["quant"] = kinds
    return man


def check_stored(cfg, sd: dict, source: str) -> dict:
    """``common.check_weights`` for tensors that may hold quantized layers (``<layer>.qweight``,
    ``.scales``, ``.mins`` standing for ``<layer>.weight``): the tensors the model uses, in
    order, contiguous; CheckpointError naming the first missing or misshapen one."""
    from llmosd.formats.common import CheckpointError, check_shapes
    from llmosd.models import quant
    try:
        groups = quant.stored_groups(sd)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    shapes = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith(quant.QSUFFIXES)}
    shapes.update({k + ".weight": quant.group_shape(g) for k, g in groups.items()})
    out = {}
    for name in check_shapes(cfg, shapes, source):
        path = name[:-len(".weight")]
        if name in sd:
            out[name] = sd[name].contiguous()
        else:
            out.update({f"{path}.{part}": t.contiguous() for part, t in groups[path].items()})
    return out
