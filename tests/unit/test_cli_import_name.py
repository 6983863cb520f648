"""Issue 11 review: `llmctl import PATH` without NAME derives the name from the path and leaves
--base alone (it used to overwrite --base with the derived name), for GGUF files, Hugging Face
directories and PEFT adapter directories.  A fake client (no daemon) that checks the import the
way the real one does (upload.import_source) before recording it."""
from __future__ import annotations

import json

import pytest

from llmctl.cli import main
from llmctl.upload import import_source


class FakeClient:
    """Records each import after the real client's source check (which refuses a base for a
    model and a PEFT directory without one)."""

    def __init__(self):
        self.calls = []

    def import_path(self, path, name, force=False, dtype=None, base=None, progress=None):
        fmt_, _ = import_source(path, base)
        self.calls.append((fmt_, name, base))
        return {"model": name + ":latest", "digest": "sha256:" + "ab" * 32, "parameters": 10, "size": 40}


def run(client, *args):
    return main(list(args), obj={"client": client})


@pytest.fixture
def sources(tmp_path):
    gguf = tmp_path / "Tiny Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 12)
    hf = tmp_path / "SmolLM-135M"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\0" * 8)
    peft = tmp_path / "qa-adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (peft / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    return gguf, hf, peft


def test_i11_review_import_without_name_keeps_base(sources, capsys):
    gguf, hf, peft = sources
    c = FakeClient()
    assert run(c, "import", str(gguf)) == 0
    assert run(c, "import", str(hf)) == 0
    assert run(c, "import", str(peft), "--base", "smol") == 0
    assert c.calls == [("gguf", "tiny-model.q8_0", None), ("hf", "smollm-135m", None),
                       ("peft", "qa-adapter", "smol")]
    out = capsys.readouterr().out
    assert "an adapter of smol" in out and "an adapter of qa-adapter" not in out
    assert out.count("an adapter of") == 1


def test_i11_review_import_with_name_unchanged(sources):
    gguf, hf, peft = sources
    c = FakeClient()
    assert run(c, "import", str(gguf), "g") == 0
    assert run(c, "import", str(peft), "a", "--base", "smol") == 0
    assert c.calls == [("gguf", "g", None), ("peft", "a", "smol")]
