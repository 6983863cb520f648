"""llmctl behaviour that needs no model: exit statuses, help, daemon-down errors, the light import."""
import json
import subprocess
import sys
import time

from conftest import SHAKESPEARE, TINY
from llmctl import errors


def llmctl(*args, env=None, input=None):
    return subprocess.run([sys.executable, "-m", "llmctl.cli", *args], capture_output=True,
                          text=True, env=env, input=input, timeout=60)


def test_import_llmctl_cli_does_not_import_torch():
    code = "import sys, llmctl, llmctl.cli; sys.exit(3 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_i9_cli_is_a_package_of_module_level_commands():
    """Each command is a click command at module level of its subject's module (none made
    inside a function), the group has exactly these, and the old modules are gone."""
    import importlib

    import click

    import llmctl.cli
    subjects = {"store": ["ls", "show", "rm", "tag", "create", "import", "export"],
                "table": ["status", "free", "ps", "load", "unload", "pin", "unpin"],
                "top": ["top"], "admin": ["fsck"], "metrics": ["metrics"], "keygen": ["keygen"],
                "infer": ["run", "generate", "chat", "score", "classify", "embed"],
                "jobs": ["train", "jobs", "logs", "cancel", "pause", "resume"],
                "finetune": ["finetune", "eval", "merge"], "http": ["serve-http"]}
    for module, names in subjects.items():
        mod = importlib.import_module(f"llmctl.cli.{module}")
        assert sorted(c.name for c in mod.COMMANDS) == sorted(names)
        for c in mod.COMMANDS:
            assert isinstance(c, click.Command) and "<locals>" not in c.callback.__qualname__
            assert c.callback.__module__ == mod.__name__
            assert llmctl.cli.cli.commands[c.name] is c
    assert sorted(llmctl.cli.cli.commands) == sorted(n for ns in subjects.values() for n in ns)
    from pathlib import Path

    from llmctl import access, client
    assert not [f for f in ("cli.py", "cli_infer.py", "chat.py") if (Path(client.__file__).parent / f).exists()]
    assert not hasattr(client, "socket_access_error") and access.check_socket_path


def test_daemon_not_running_is_fast_and_clear(tmp_path):
    t0 = time.monotonic()
    r = llmctl("--socket", f"ipc://{tmp_path}/none.sock", "ps")
    assert r.returncode == errors.EX_UNAVAILABLE
    assert "is llmosd running?" in r.stderr and time.monotonic() - t0 < 10
    # a socket file with nobody behind it: the hello times out within connect_timeout
    from llmctl import Client
    stale = tmp_path / "stale.sock"
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    t0 = time.monotonic()
    try:
        Client(f"ipc://{stale}", connect_timeout=1.0).connect()
        raise AssertionError("connected to nothing")
    except errors.DaemonUnavailable as e:
        assert "is llmosd running?" in str(e)
    assert time.monotonic() - t0 < 5


def test_usage_errors_exit_64():
    assert llmctl("generate").returncode == errors.EX_USAGE
    assert llmctl("frobnicate").returncode == errors.EX_USAGE
    assert llmctl("create", "x", "--layers", "two").returncode == errors.EX_USAGE


def test_help_is_complete():
    out = llmctl("--help").stdout
    for cmd in ("status", "ps", "ls", "show", "create", "rm", "tag", "load", "unload", "generate"):
        assert cmd in out
        assert llmctl(cmd, "--help").returncode == 0
    assert "--vocab-from" in llmctl("create", "--help").stdout


def test_store_commands_and_errors(shared_daemon):
    d = shared_daemon
    r = d.cli("generate", "missing-model", "hi", check=False)
    assert r.returncode == errors.EX_NOINPUT and "hint:" in r.stderr
    r = d.cli("create", "tiny", *TINY, "--vocab-from", str(SHAKESPEARE), check=False)
    assert r.returncode == errors.EX_CANTCREAT and "already exists" in r.stderr
    r = d.cli("create", "odd", "--layers", "1", "--dim", "60", "--heads", "8",
              "--vocab-from", str(SHAKESPEARE), check=False)
    assert r.returncode == errors.EX_DATAERR and "divisible" in r.stderr
    r = d.cli("generate", "tiny", "x", "--top-p", "0", check=False)
    assert r.returncode == errors.EX_DATAERR and "top_p" in r.stderr
    d.cli("tag", "tiny", "tiny:copy")
    ls = {m["model"]: m for m in json.loads(d.cli("ls", "--json").stdout)}
    assert ls["tiny:copy"]["digest"] == ls["tiny:latest"]["digest"]
    show = json.loads(d.cli("show", "tiny:copy", "--json").stdout)
    assert show["config"]["num_key_value_heads"] == 2 and show["manifest"]["lineage"]["method"] == "create"
    assert "num_hidden_layers" in d.cli("show", "tiny").stdout
    d.cli("rm", "tiny:copy")
    assert "tiny:copy" not in d.cli("ls").stdout
    assert d.cli("rm", "tiny:copy", check=False).returncode == errors.EX_NOINPUT
    assert "NAME" in d.cli("ls").stdout and "daemon:" in d.cli("status").stdout


def test_stop_strings(shared_daemon):
    d = shared_daemon
    full = d.cli("generate", "tiny", "ROMEO:", "--max-tokens", "30", "--temperature", "0").stdout
    cut = full[5:8]
    stopped = d.cli("generate", "tiny", "ROMEO:", "--max-tokens", "30", "--temperature", "0",
                    "--stop", cut, "--json").stdout.splitlines()
    text = "".join(json.loads(ln).get("text", "") for ln in stopped[:-1])
    assert text == full[:full.find(cut)] and json.loads(stopped[-1])["finish_reason"] == "stop"


def test_ctrl_c_cancels_cleanly(shared_daemon):
    import signal
    d = shared_daemon
    p = subprocess.Popen([sys.executable, "-m", "llmctl.cli", "generate", "tiny", "Once",
                          "--max-tokens", "1500", "--temperature", "0"], env=d.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.read(5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(30)
    assert p.returncode == 130 and "cancelled" in err and "Traceback" not in err
    with d.client() as c:
        deadline = time.monotonic() + 10
        while any(i["active_requests"] for i in c.ps()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(i["active_requests"] == 0 for i in c.ps())
