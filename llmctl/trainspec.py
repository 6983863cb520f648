"""Training specs on the client side: the keys, spec files (TOML or JSON), data-file checks.
Fine-tuning (``FINETUNE_KEYS``) and evaluation (``EVAL_KEYS``) specs are checked the same way.

What can be known without the daemon is checked here, before anything is uploaded: that each
data file exists and can be read, that a spec file parses (a syntax error names its line), that
its keys are known and its values have the right type.  Ranges, data content (a bad JSONL line,
too little text) and keys that clash with an existing model are the daemon's checks at submit.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import stat

from .errors import InvalidArgument

TOKENIZERS = ("unigram", "bpe", "char")
DTYPES = ("auto", "float32", "bfloat16")        # training precision: float32, or bf16 autocast

# Every key of a training spec (protocol 1.5, message 'train') and the type of its value.
SPEC_KEYS: dict[str, type] = {
    "tokenizer": str, "vocab_size": int, "layers": int, "dim": int, "heads": int, "kv_heads": int,
    "block_size": int, "batch_size": int, "grad_accum": int, "max_steps": int, "lr": float,
    "min_lr": float, "warmup": int, "weight_decay": float, "dropout": float, "eval_every": int,
    "eval_batches": int, "checkpoint_every": int, "nproc": int, "seed": int, "device": str,
    "dtype": str,
}

# Keys that fix the architecture or the tokenizer: fine-tuning keeps its base's.
ARCH_KEYS = ("tokenizer", "vocab_size", "layers", "dim", "heads", "kv_heads")
FT_METHODS = ("full", "lora", "classify")
# Training keys fine-tuning refuses, and why (the daemon refuses them too).
FT_REFUSED = {"eval_batches": "a fine-tune's validation loss covers every validation example; "
                              "eval_samples (--eval-samples) caps the greedy answers"}
ALL_LINEAR = "all-linear"
# Every key of a fine-tuning spec (protocol 1.6, message 'finetune'): the training keys but the
# architecture's, and the fine-tuning ones.  ``list`` values take a list of strings or a comma
# string ("q_proj,v_proj"); ``targets`` also takes "all-linear".
FINETUNE_KEYS: dict[str, type] = {
    **{k: v for k, v in SPEC_KEYS.items() if k not in ARCH_KEYS and k not in FT_REFUSED},
    "method": str, "rank": int, "alpha": float, "lora_dropout": float, "targets": list,
    "labels": list, "head_only": bool, "epochs": float, "eval_samples": int,
}
LORA_KEYS = ("rank", "alpha", "lora_dropout", "targets")
EVAL_METRICS = ("loss", "perplexity", "accuracy", "f1", "exact_match", "chrf")
# The keys of an evaluation spec (message 'eval').
EVAL_KEYS: dict[str, type] = {"metrics": list, "eval_samples": int, "block_size": int,
                              "batch_size": int, "device": str, "seed": int}
CHOICES = {"tokenizer": TOKENIZERS, "dtype": DTYPES, "method": FT_METHODS}


def load_spec_file(path: str, keys: dict[str, type] = SPEC_KEYS) -> dict:
    """The spec in the TOML (``.toml``) or JSON (anything else that starts with ``{``) file at
    ``path``, checked with ``check_spec`` against ``keys``.  OSError when it cannot be read;
    InvalidArgument naming the file and line for a syntax error, an unknown key or a value of
    the wrong type."""
    with open(path, "rb") as f:
        raw = f.read(1 << 20)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not UTF-8 text (byte {e.start})",
                              hint="a spec file is TOML or JSON text") from None
    if path.endswith(".json") or (not path.endswith(".toml") and text.lstrip().startswith("{")):
        spec = _parse_json(path, text)
    else:
        spec = _parse_toml(path, text)
    return check_spec(spec, where=lambda key: f"{path} line {_line_of(text, key)}", keys=keys)


def _parse_json(path: str, text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{path} line {e.lineno}: {e.msg} (column {e.colno})",
                              hint="the spec file must be one JSON object of spec keys") from None
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path}: a JSON spec must be an object, got {type(spec).__name__}")
    return spec


def _parse_toml(path: str, text: str) -> dict:
    import tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says "... (at line 3, column 7)": lead with the line, as compilers do
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        where = f"{path} line {m.group(1)}" if m else path
        raise InvalidArgument(f"{where}: {msg}" + (f" (column {m.group(2)})" if m else ""),
                              hint="the spec file is TOML (key = value lines) or JSON") from None


def _line_of(text: str, key: str) -> int | str:
    """The line on which ``key`` is set in a TOML or JSON text ('?' if it cannot be found)."""
    pat = re.compile(rf'^\s*(?:"{re.escape(key)}"\s*:|{re.escape(key)}\s*=|"{re.escape(key)}"\s*=)')
    for i, line in enumerate(text.splitlines(), 1):
        if pat.search(line) or (f'"{key}"' in line and ":" in line):
            return i
    return "?"


def check_spec(spec: dict, where=lambda key: "spec", keys: dict[str, type] = SPEC_KEYS) -> dict:
    """``spec`` if every key is in ``keys`` and every value has its key's type (an int is a
    float; a float with no fraction is an int; a ``list`` key takes a comma string too), else
    InvalidArgument; ``where(key)`` says where."""
    out = {}
    for key, value in spec.items():
        if key not in keys:
            near = difflib.get_close_matches(str(key), keys, n=1)
            arch = keys is not SPEC_KEYS and key in ARCH_KEYS
            why = FT_REFUSED.get(key) if keys is FINETUNE_KEYS else None
            raise InvalidArgument(f"{where(key)}: unknown key {key!r}"
                                  + (" (fine-tuning keeps the base model's architecture and tokenizer)"
                                     if arch else f" ({why})" if why
                                     else f"; did you mean {near[0]!r}?" if near else ""),
                                  hint="spec keys: " + ", ".join(keys))
        want = keys[key]
        if want is list:
            out[key] = _string_list(key, value, where)
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif want is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise InvalidArgument(f"{where(key)}: {key} must be {_TYPE_WORDS[want]}, "
                                  f"got {json.dumps(value) if _jsonable(value) else type(value).__name__}")
        if key in CHOICES and value not in CHOICES[key]:
            raise InvalidArgument(f"{where(key)}: {key} must be one of {', '.join(CHOICES[key])}, "
                                  f"got {value!r}")
        out[key] = value
    return out


def _string_list(key: str, value, where) -> list[str] | str:
    """A list key's value as a list of non-empty strings ("a,b" and ["a", "b"] alike);
    ``targets`` keeps "all-linear" as the string the daemon takes."""
    if isinstance(value, str):
        if key == "targets" and value.strip() == ALL_LINEAR:
            return ALL_LINEAR
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where(key)}: {key} must be a list of strings or a comma-separated "
                              f"string, got {json.dumps(value) if _jsonable(value) else type(value).__name__}")
    items = [v.strip() for v in value]
    if not items or any(not v for v in items):
        raise InvalidArgument(f"{where(key)}: {key} has an empty name in {','.join(items)!r}",
                              hint="separate names with single commas: a,b,c")
    if key == "metrics":
        for m in items:
            if m not in EVAL_METRICS:
                raise InvalidArgument(f"{where(key)}: unknown metric {m!r}",
                                      hint="metrics: " + ", ".join(EVAL_METRICS))
    if key == "targets" and items == [ALL_LINEAR]:
        return ALL_LINEAR
    return items


def finetune_conflict(spec: dict) -> str | None:
    """What is wrong with the combination of keys in a fine-tuning ``spec`` (None if nothing):
    labels or head_only without method classify, LoRA keys where no LoRA is trained (method
    full, or classify with head_only), both epochs and max_steps.  Pure; the CLI makes it a
    usage error, ``Client.finetune`` an InvalidArgument."""
    method = spec.get("method", "lora")
    if spec.get("labels") is not None and method != "classify":
        return f"labels (--labels) are for --method classify, not {method}"
    if spec.get("head_only") and method != "classify":
        return f"head_only (--head-only) is for --method classify, not {method}"
    no_lora = "full" if method == "full" else "classify with --head-only" if spec.get("head_only") else None
    for key in LORA_KEYS:
        if no_lora and spec.get(key) is not None:
            return (f"{key} (--{key.replace('_', '-')}) sets up LoRA, and --method {no_lora} "
                    f"trains no LoRA adapter")
    if spec.get("epochs") is not None and spec.get("max_steps") is not None:
        return "give either epochs (--epochs) or max_steps (--max-steps), not both"
    return None


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def merge_spec(file_spec: dict | None, flags: dict, keys: dict[str, type] = SPEC_KEYS) -> dict:
    """The spec to send: the file's keys, overridden by the flags that were given (not None)."""
    spec = dict(file_spec or {})
    spec.update({k: v for k, v in flags.items() if v is not None})
    return check_spec(spec, where=lambda key: "flag --" + key.replace("_", "-"), keys=keys)


NO_DATA = "no data: give at least one --data FILE (text files, or JSONL with one {\"text\": ...} per line)"


def data_files(paths, no_data: str = NO_DATA) -> dict[str, str]:
    """{name in the job: path} for the data files ``paths``, each checked to be a readable
    regular file (OSError naming it, before anything is sent).  The same file given twice counts
    once; two different files with the same base name are refused (the job names files by it).
    No file at all is a usage error saying ``no_data``."""
    if not paths:                       # a usage error (64), not bad data
        import click
        raise click.UsageError(no_data)
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for path in paths:
        check_readable(path)
        real = os.path.realpath(path)
        name = os.path.basename(path).lstrip(".") or "data.txt"
        if name in out:
            if seen[name] == real:
                continue
            raise InvalidArgument(f"two data files are named {name}: {out[name]} and {path}",
                                  hint="rename one of them (the job names its data files by base name)")
        out[name], seen[name] = path, real
    return out


def check_readable(path: str) -> None:
    """OSError (with the file name) unless ``path`` is a regular file this process can read."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "is a directory, not a data file", path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(22, "not a regular file", path)
    with open(path, "rb") as f:
        f.read(1)
