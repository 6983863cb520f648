import subprocess
import sys

import pytest

from llmctl import errors
from llmosd import config


def test_precedence_default_file_env_flag(tmp_path):
    f = tmp_path / "llmosd.toml"
    f.write_text('[llmosd]\nlog_level = "warning"\ndefault_max_tokens = 100\nthreads = 3\n'
                 'socket = "ipc:///from/file.sock"\n')
    env = {"LLMOSD_DEFAULT_MAX_TOKENS": "200", "LLMOSD_THREADS": "4"}
    cfg, src = config.load(str(f), {"threads": 5, "socket": None}, environ=env)
    assert cfg.log_level == "warning" and src["log_level"].startswith("file")
    assert cfg.default_max_tokens == 200 and src["default_max_tokens"] == "env LLMOSD_DEFAULT_MAX_TOKENS"
    assert cfg.threads == 5 and src["threads"] == "flag"
    assert cfg.socket == "ipc:///from/file.sock"
    assert cfg.heartbeat_ms == 1000 and src["heartbeat_ms"] == "default"


def test_user_mode_paths(tmp_path):
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "rt"), "XDG_STATE_HOME": str(tmp_path / "st")}
    import os
    old = dict(os.environ)
    os.environ.update(env)
    try:
        cfg, _ = config.load("/dev/null", {"user": True}, environ={})
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert cfg.socket == f"ipc://{tmp_path}/rt/llmosd/llmosd.sock"
    assert cfg.state_dir == f"{tmp_path}/st/llmosd"


@pytest.mark.parametrize("text,needle", [("bogus = 1", "unknown setting"),
                                         ("threads = 'many'", "threads"),
                                         ("device = 'tpu'", "device"),
                                         ("this is not toml", "cannot read")])
def test_bad_config_is_named(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(errors.ConfigError, match=needle):
        config.load(str(f), {}, environ={})


def test_missing_explicit_config_file():
    with pytest.raises(errors.ConfigError, match="does not exist"):
        config.load("/nonexistent/llmosd.toml", {}, environ={})


def test_print_config_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmosd", "--config", "/dev/null", "--print-config",
                        "--socket", "ipc:///tmp/x.sock"], capture_output=True, text=True,
                       env={"LLMOSD_HEARTBEAT_MS": "250", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert 'socket = "ipc:///tmp/x.sock"  # flag' in r.stdout
    assert "heartbeat_ms = 250  # env LLMOSD_HEARTBEAT_MS" in r.stdout
    import tomllib
    assert tomllib.loads(r.stdout)["llmosd"]["heartbeat_ms"] == 250
    r = subprocess.run([sys.executable, "-m", "llmosd", "--config", "/dev/null", "--log-level", "loud"],
                       capture_output=True, text=True)
    assert r.returncode == errors.EX_CONFIG and "log_level" in r.stderr
