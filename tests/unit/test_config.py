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


# -- issue 12: budgets and keep-alive ------------------------------------------------------------
def test_i12_budgets_from_file_env_and_flags(tmp_path):
    f = tmp_path / "llmosd.toml"
    f.write_text('[llmosd]\nkeep_alive = "5m"\n\n[devices.cpu]\nbudget = "8GiB"\n\n'
                 '[devices.cuda0]\nbudget = "90%"\n\n[devices.host]\nbudget = "4GiB"\n')
    cfg, src = config.load(str(f), {}, environ={})
    assert cfg.budgets == {"cpu": "8GiB", "cuda0": "90%", "host": "4GiB"}
    assert cfg.keep_alive == 300.0 and src["keep_alive"].startswith("file")
    assert src["devices.cpu.budget"] == f"file {f}"
    cfg, src = config.load(str(f), {"budget": ["cuda:0=50%", "host=1GiB,cpu=2GiB"]},
                           environ={"LLMOSD_BUDGET": "cpu=6GiB, host=2GiB", "LLMOSD_KEEP_ALIVE": "-1"})
    assert cfg.budgets == {"cpu": "2GiB", "cuda0": "50%", "host": "1GiB"}
    assert cfg.budget_sources == {"cpu": "flag --budget", "cuda0": "flag --budget", "host": "flag --budget"}
    assert cfg.keep_alive == -1.0
    cfg, _ = config.load(str(f), {}, environ={"LLMOSD_BUDGET": "cpu=6GiB"})
    assert cfg.budgets["cpu"] == "6GiB" and cfg.budget_sources["cpu"] == "env LLMOSD_BUDGET"
    # [llmosd.devices.cpu] works too; defaults are empty (auto, resolved against the hardware)
    f.write_text('[llmosd.devices.cpu]\nbudget = 1073741824\n')
    assert config.load(str(f), {}, environ={})[0].budgets == {"cpu": 1 << 30}
    assert config.load("/dev/null", {}, environ={})[0].budgets == {}


@pytest.mark.parametrize("value,want", [("5m", 300.0), ("300", 300.0), ("-1", -1.0), ("0", 0.0),
                                        ("1h30m", 5400.0), (45, 45.0), ("2.5s", 2.5)])
def test_i12_keep_alive_durations(value, want):
    assert config.load("/dev/null", {}, environ={"LLMOSD_KEEP_ALIVE": str(value)})[0].keep_alive == want
    assert config.parse_duration(value) == want


@pytest.mark.parametrize("text,needle", [
    ('[devices.cpu]\nbudget = "lots"', "devices.cpu.budget must be a size"),
    ('[devices.cpu]\nbudget = "150%"', "devices.cpu.budget must be a size"),
    ('[devices.tpu]\nbudget = "1GiB"', "unknown device 'tpu'"),
    ('[devices.cpu]\nbudget = "1GiB"\nlimit = 3', r"\[devices.cpu\] may hold only 'budget'"),
    ('keep_alive = "soon"', "keep_alive"),
])
def test_i12_bad_budgets_and_durations_are_named(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(errors.ConfigError, match=needle):
        config.load(str(f), {}, environ={})
    with pytest.raises(errors.ConfigError, match="DEVICE=SIZE"):
        config.load("/dev/null", {"budget": ["cpu"]}, environ={})


def test_i12_print_config_shows_budgets_and_reloads(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmosd", "--config", "/dev/null", "--print-config",
                        "--budget", "cpu=8GiB", "--budget", "host=1GiB"], capture_output=True, text=True,
                       env={"LLMOSD_BUDGET": "cuda0=80%", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert 'budget = "8GiB"  # flag --budget' in r.stdout
    assert 'budget = "80%"  # env LLMOSD_BUDGET' in r.stdout
    assert "keep_alive = 300.0  # default" in r.stdout
    import tomllib
    data = tomllib.loads(r.stdout)
    assert data["devices"]["cpu"]["budget"] == "8GiB" and data["llmosd"]["keep_alive"] == 300.0
    f = tmp_path / "again.toml"
    f.write_text(r.stdout)                          # what it prints loads back as the same settings
    cfg, _ = config.load(str(f), {}, environ={})
    assert cfg.budgets == {"cpu": "8GiB", "cuda0": "80%", "host": "1GiB"}
    r = subprocess.run([sys.executable, "-m", "llmosd", "--config", "/dev/null", "--print-config",
                        "--budget", "gpu=1GiB"], capture_output=True, text=True)
    assert r.returncode == errors.EX_CONFIG and "unknown device 'gpu'" in r.stderr


def test_i12_example_config_lists_every_key():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "systemd" / "llmosd.toml").read_text()
    missing = [k for k in config._KEYS if f"# {k} = " not in text]
    assert not missing, f"systemd/llmosd.toml does not show {missing}"
    for section in ("cpu", "cuda0", "host"):
        assert f"# [devices.{section}]" in text


def test_i14_1_system_flag_reads_the_system_config_whatever_the_uid(tmp_path, monkeypatch):
    f = tmp_path / "system.toml"
    f.write_text("[llmosd]\nmax_jobs = 3\n")
    monkeypatch.setattr(config.paths, "SYSTEM_CONFIG", str(f))
    monkeypatch.setattr(config.os, "getuid", lambda: 1000)
    cfg, src = config.load(None, {"system": True}, environ={})
    assert cfg.max_jobs == 3 and cfg.config_file == str(f)
    assert cfg.socket == config.paths.SYSTEM_SOCKET and cfg.state_dir == config.paths.SYSTEM_STATE_DIR
    assert src["socket"] == "default (system mode)"
    with pytest.raises(errors.ConfigError, match="exclude each other"):
        config.load(None, {"system": True, "user": True}, environ={})


@pytest.mark.parametrize("text,needle", [
    ('[llmosd]\n# x\nmax_jobs = "many"\n', "line 3: 'max_jobs'"),
    ('[llmosd]\n\nlog_level = "loud"\n', "line 3: log_level must be"),
    ('[llmosd]\nbogus = 1\n', "line 2: unknown setting 'bogus'"),
    ('[llmosd]\n[devices.cpu]\n\nbudget = "lots"\n', "line 4: devices.cpu.budget"),
    ('keep_alive = = 1\n', "at line 1"),
])
def test_i14_reload_errors_name_the_line_and_key(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(errors.ConfigError, match=needle) as e:
        config.load(str(f), {}, environ={})
    assert str(f) in str(e.value)


def test_i14_reload_changes_split_runtime_keys_from_restart_keys(tmp_path):
    old, _ = config.load("/dev/null", {}, environ={})
    f = tmp_path / "c.toml"
    f.write_text('[llmosd]\nkeep_alive = "1h"\nlog_level = "debug"\nmax_jobs = 2\nsend_hwm = 5\n'
                 '[devices.cpu]\nbudget = "1GiB"\n')
    new, _ = config.load(str(f), {}, environ={})
    apply, restart = config.reload_changes(old, new)
    assert apply == {"keep_alive": (300.0, 3600.0), "log_level": ("info", "debug"), "max_jobs": (1, 2)}
    assert restart == {"send_hwm": (1000, 5), "devices.cpu.budget": ("auto", "1GiB")}
    assert set(config.RELOADABLE) <= set(config._KEYS) | {"quotas"}


def test_i14_access_settings_reload_without_restart(tmp_path):
    """admin_group, shared_inference and the [quotas] tables apply on SIGHUP (the handlers
    read the shared Config), so an administrator tightens a quota without a restart."""
    import types
    from llmosd.main import Reloader
    old, _ = config.load("/dev/null", {}, environ={})
    f = tmp_path / "c.toml"
    f.write_text('[llmosd]\nadmin_group = "wheel"\nshared_inference = false\n'
                 '[quotas.users.root]\nmax_instances = 2\n')
    new, _ = config.load(str(f), {}, environ={})
    apply, restart = config.reload_changes(old, new)
    assert set(apply) == {"admin_group", "shared_inference", "quotas"} and not restart
    fake = types.SimpleNamespace()
    r = Reloader(old, lambda: new, manager=fake, jobs=fake, uploads=fake)
    r.reload()
    assert old.admin_group == "wheel" and old.shared_inference is False
    assert old.quotas == new.quotas and old.quotas
