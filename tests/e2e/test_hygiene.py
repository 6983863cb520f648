"""Issue 8: the suite runs in a plain clone (1), leaves no daemon behind (2), and the manual pages
lint clean (7)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SHAKESPEARE, Daemon, leftovers

# Where the project may not point: a sibling checkout's data (a plain clone has nothing beside it).
OUTSIDE = re.compile(r"\.\./shared|shared/data|\.parent\s*/\s*[\"']shared[\"']")


def _project_files():
    """Text files of the tests, benchmarks, CI scripts, docs and README."""
    for top in ("tests", "bench", ".ci", "docs", "man", "README.md"):
        path = ROOT / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix in (".pyc", ".txt", ".json"):
                continue
            yield f


def test_i8_1_tests_need_nothing_outside_the_repo():
    assert SHAKESPEARE.is_relative_to(ROOT) and SHAKESPEARE.is_file()
    assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest() == \
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    me = os.path.realpath(__file__)
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
            for f in _project_files() if os.path.realpath(f) != me
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "the project reads data from outside the repository:\n" + "\n".join(hits)


LEAKY_TESTS = """
import subprocess, sys
from conftest import Daemon
KEEP = []

def test_forgets_its_daemon(tmp_path):              # caught by the per-test check
    KEEP.append(Daemon(tmp_path / "a").start(wait=False))

def test_fixture_daemon_never_stopped(tmp_path):    # caught at session end (registry)
    d = Daemon(tmp_path / "b")
    d.outlives_test = True
    KEEP.append(d.start(wait=False))

def test_daemon_started_by_hand(tmp_path):          # caught at session end (/proc scan)
    KEEP.append(subprocess.Popen([sys.executable, "-m", "llmosd", "--socket", f"ipc://{tmp_path}/c.sock",
                                  "--state-dir", str(tmp_path / "c"), "--config", "/dev/null"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
"""


def test_i8_2_no_daemon_left_running(tmp_path):
    """Daemons the tests forget fail the run (exit status 1), are named and killed: one left by
    a test (its teardown errors), one a wider fixture left, one started without ``Daemon``.
    Runs a small pytest session with this conftest as its plugin."""
    (tmp_path / "test_leak.py").write_text(LEAKY_TESTS)
    inner = tmp_path / "inner"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                        "--basetemp", str(inner), "--rootdir", str(tmp_path), str(tmp_path / "test_leak.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "3 passed, 1 error" in out and "the test left llmosd processes running" in out, out
    tail = out[out.index("llmosd processes left running by the tests"):]
    assert re.search(r"test_fixture_daemon_never_\w*/b/state", tail), out     # pytest shortens names
    assert re.search(r"test_daemon_started_by_hand\w*/c ", tail), out
    assert leftovers([], inner) == []                  # nothing of it survives


def test_i8_2_stop_cleans_up_whatever_state_the_daemon_is_in(tmp_path):
    """stop() is idempotent and also works after kill9() (log closed, group gone)."""
    d = Daemon(tmp_path / "d").start()
    try:
        d.kill9()
        assert d.stop() == -9 and d.stop() == -9
        assert d._logf is None and not d.alive()
        d.start()
        assert d.alive()
    finally:
        assert d.stop() == 0
    assert not d.alive() and leftovers([d], tmp_path) == []


@pytest.mark.skipif(shutil.which("mandoc") is None,
                    reason="mandoc is not installed (apt-get install mandoc; .ci/setup tries)")
def test_i8_7_man_pages_lint_clean():
    pages = sorted(str(p) for p in (ROOT / "man").iterdir() if p.is_file())
    r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", *pages], capture_output=True, text=True)
    assert r.stdout + r.stderr == "" and r.returncode == 0, r.stdout + r.stderr
