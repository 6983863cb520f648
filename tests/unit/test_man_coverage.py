"""Issue 14.6: every llmctl command and flag, and every config key, appears in the man pages."""
import dataclasses
import re
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[2]


def man_text(name: str) -> str:
    """The page's text with roff escapes for '-' undone, so flags read as typed."""
    text = (ROOT / "man" / name).read_text().replace("\\-", "-").replace("\\(em", "-")
    return re.sub(r"\\f[BIRP]", "", text)          # font changes: \fIkey\fR reads as key


def test_i14_6_every_llmctl_command_and_flag_is_in_llmctl_1():
    import llmctl.cli
    text = man_text("llmctl.1")
    missing = []
    for name, cmd in sorted(llmctl.cli.cli.commands.items()):
        if not re.search(rf"\b{re.escape(name)}\b", text):
            missing.append(name)
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                longs = [o for o in p.opts + p.secondary_opts if o.startswith("--")]
                if longs and not any(o in text for o in longs):
                    missing.append(f"{name} {longs[0]}")
    assert not missing, f"not in man/llmctl.1: {missing}"


def test_i14_6_every_config_key_is_in_llmosd_8():
    from llmosd.config import Config
    text = man_text("llmosd.8")
    keys = [f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")]
    missing = [k for k in keys if not re.search(rf"\b{re.escape(k)}\b", text)]
    assert not missing, f"not in man/llmosd.8: {missing}"
