"""Training specs on the client side: the keys, spec files (TOML or JSON), data-file checks.

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


def load_spec_file(path: str) -> dict:
    """The spec in the TOML (``.toml``) or JSON (anything else that starts with ``{``) file at
    ``path``, checked with ``check_spec``.  OSError when it cannot be read; InvalidArgument
    naming the file and line for a syntax error, an unknown key or a value of the wrong type."""
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
    return check_spec(spec, where=lambda key: f"{path} line {_line_of(text, key)}")


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


def check_spec(spec: dict, where=lambda key: "spec") -> dict:
    """``spec`` if every key is known and every value has its key's type (an int is a float;
    a float with no fraction is an int), else InvalidArgument; ``where(key)`` says where."""
    out = {}
    for key, value in spec.items():
        if key not in SPEC_KEYS:
            near = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            raise InvalidArgument(f"{where(key)}: unknown key {key!r}"
                                  + (f"; did you mean {near[0]!r}?" if near else ""),
                                  hint="spec keys: " + ", ".join(SPEC_KEYS))
        want = SPEC_KEYS[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif want is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, want) or isinstance(value, bool):
            raise InvalidArgument(f"{where(key)}: {key} must be {_TYPE_WORDS[want]}, "
                                  f"got {json.dumps(value) if _jsonable(value) else type(value).__name__}")
        for name, choices in (("tokenizer", TOKENIZERS), ("dtype", DTYPES)):
            if key == name and value not in choices:
                raise InvalidArgument(f"{where(key)}: {name} must be one of {', '.join(choices)}, "
                                      f"got {value!r}")
        out[key] = value
    return out


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def merge_spec(file_spec: dict | None, flags: dict) -> dict:
    """The spec to send: the file's keys, overridden by the flags that were given (not None)."""
    spec = dict(file_spec or {})
    spec.update({k: v for k, v in flags.items() if v is not None})
    return check_spec(spec, where=lambda key: "flag --" + key.replace("_", "-"))


def data_files(paths) -> dict[str, str]:
    """{name in the job: path} for the data files ``paths``, each checked to be a readable
    regular file (OSError naming it, before anything is sent).  The same file given twice counts
    once; two different files with the same base name are refused (the job names files by it)."""
    if not paths:                       # a usage error (64), not bad data
        import click
        raise click.UsageError("no data: give at least one --data FILE (text files, or JSONL "
                               "with one {\"text\": ...} per line)")
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
