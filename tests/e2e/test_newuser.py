"""What a new user hits (issue 8) and two client points of issue 7: `llmctl run`, suggestions,
stdin with a prompt, honest progress, no tracebacks at the edges, a Generation left early is
cancelled, a paused reader survives, and a socket one cannot use says "permission denied"."""
from __future__ import annotations

import calendar
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from click.testing import CliRunner

from llmctl import errors
from llmctl.cli import cli, suggest_command
from llmctl.cli.infer import join_stdin_prompt, logprob_lines, read_prompt


def llmctl(*args, env=None, input=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "llmctl.cli", *args], capture_output=True,
                          text=True, env=env, input=input, timeout=timeout)


def one_line_error(r, status):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("llmctl: "), r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr       # the error, maybe a hint


# -- a fake client for the CLI's own decisions --------------------------------------------
class FakeGen:
    def __init__(self, chunks, stats):
        self._chunks, self.stats, self.chunks = list(chunks), None, []
        self._final = stats

    def __iter__(self):
        return self

    def __next__(self):
        if not self._chunks:
            self.stats = self._final
            raise StopIteration
        self.chunks.append(self._chunks.pop(0))
        return self.chunks[-1].get("text", "")

    def cancel(self):
        return self.stats


class FakeClient:
    def __init__(self, template=None, chunks=({"text": "ok", "token_ids": [5]},),
                 stats=None):
        self.template, self.calls = template, []
        self._chunks, self._stats = chunks, stats or {"finish_reason": "length", "generated_tokens": 1}

    def show(self, model):
        self.calls.append(("show", model))
        return {"model": model, "manifest": {"chat_template": self.template}, "config": {}}

    def chat(self, model, messages, **opts):
        self.calls.append(("chat", model, messages))
        return FakeGen(self._chunks, self._stats)

    def generate(self, model, prompt, **opts):
        self.calls.append(("generate", model, prompt))
        return FakeGen(self._chunks, self._stats)

    def rm(self, model, force=False):
        self.calls.append(("rm", model))
        return {"model": model, "freed_bytes": 0}

    def tag(self, source, target, force=False):
        self.calls.append(("tag", source, target, force))
        return {"source": source, "model": target}

    def load(self, model):
        return {"id": 3, "model": model, "state": "ready", "device": "cpu", "resident_bytes": 1,
                "load_ms": 0.0, "already_loaded": True}

    def unload(self, target, force=False):
        return {"unloaded": []}


def invoke(client, *args, input=None):
    return CliRunner().invoke(cli, list(args), obj={"client": client}, input=input)


# -- 8.3: run, hints, stdin, suggestions ----------------------------------------------------
def test_i8_3_run_uses_chat_template():
    c = FakeClient(template="{{ messages }}")
    r = invoke(c, "run", "m", "Why is the sky blue?", input="")
    assert r.exit_code == 0, r.output
    assert c.calls[-1] == ("chat", "m", [{"role": "user", "content": "Why is the sky blue?"}])
    c = FakeClient(template=None)
    r = invoke(c, "run", "m", "Once upon", input="")
    assert r.exit_code == 0 and c.calls[-1] == ("generate", "m", "Once upon")
    r = invoke(FakeClient(template=None), "run", "m", "x", "--system", "be brief", input="")
    assert r.exit_code == 2 and "no chat template" in r.output          # click's usage error


def test_i8_3_run_without_prompt_in_a_terminal_starts_the_conversation(monkeypatch):
    import llmctl.cli.infer
    import llmctl.cli.repl
    sessions = []
    monkeypatch.setattr(llmctl.cli.infer, "read_prompt", lambda prompt, stdin: None)   # a terminal
    monkeypatch.setattr(llmctl.cli.repl.ChatSession, "run", lambda self, inp, out: sessions.append(self))
    for template, plain in (("{{ messages }}", False), (None, True)):
        assert invoke(FakeClient(template=template), "run", "m").exit_code == 0
        assert sessions[-1].model == "m" and sessions[-1].plain is plain


@pytest.fixture(scope="module")
def chat_model(shared_daemon, tmp_path_factory):
    """'tiny' with a ChatML template: exported, given the template, imported as tiny-chat."""
    d = tmp_path_factory.mktemp("chat") / "hf"
    shared_daemon.cli("export", "tiny", str(d))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    tcfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                             "<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    shared_daemon.cli("import", str(d), "tiny-chat", "--force")
    yield "tiny-chat"
    shared_daemon.cli("unload", "tiny-chat", check=False)
    shared_daemon.cli("rm", "tiny-chat", check=False)


def _stats(r):
    return json.loads(r.stdout.splitlines()[-1])


def test_i8_3_run_end_to_end_chat_and_plain(shared_daemon, chat_model):
    d = shared_daemon
    args = ("--max-tokens", "2", "--temperature", "0", "--json")
    via_run = _stats(d.cli("run", chat_model, "hello", *args, input=""))
    via_chat = _stats(d.cli("generate", chat_model, "hello", "--chat", *args, input=""))
    plain = _stats(d.cli("generate", chat_model, "hello", *args, input=""))
    assert via_run["prompt_tokens"] == via_chat["prompt_tokens"] != plain["prompt_tokens"]
    assert _stats(d.cli("run", "tiny", "hello", *args, input=""))["prompt_tokens"] == \
        _stats(d.cli("generate", "tiny", "hello", *args, input=""))["prompt_tokens"]


def test_i8_3_generate_hints_at_a_chat_model_that_stops_at_once():
    stops = {"finish_reason": "stop", "generated_tokens": 1}
    c = FakeClient(template="{{ messages }}", chunks=[{"text": "", "token_ids": []}], stats=stops)
    r = invoke(c, "generate", "m", "hi", input="")          # output: stdout and stderr
    assert r.exit_code == 0 and "hint: m is a chat model; try 'llmctl run m' or --chat" in r.output
    c = FakeClient(template=None, chunks=[{"text": "", "token_ids": []}], stats=stops)
    r = invoke(c, "generate", "m", "hi", input="")
    assert "hint:" not in r.output and not any(call[0] == "chat" for call in c.calls)
    c = FakeClient(template="{{ messages }}")              # it wrote something: no hint
    assert "hint:" not in invoke(c, "generate", "m", "hi", input="").output


def test_i8_3_stdin_and_prompt_both_sent(shared_daemon):
    assert join_stdin_prompt("notes\n", "Summarize:") == "notes\nSummarize:"
    assert join_stdin_prompt("notes", "Summarize:") == "notes\nSummarize:"
    assert join_stdin_prompt("", "Summarize:") == "Summarize:"
    rfd, wfd = os.pipe()
    os.write(wfd, b"piped text")
    os.close(wfd)
    with os.fdopen(rfd) as pipe:
        assert read_prompt("question", pipe) == "piped text\nquestion"
    with open(os.devnull) as null:               # /dev/null (cron, CI): nothing to add, no wait
        assert read_prompt("question", null) == "question"
    # end to end: the prompt the daemon tokenized is the joined text, for generate and run
    d = shared_daemon
    args = ("--max-tokens", "1", "--temperature", "0", "--json")
    both = _stats(d.cli("generate", "tiny", "ROMEO:", *args, input="First Citizen:\n"))
    joined = _stats(d.cli("generate", "tiny", "First Citizen:\nROMEO:", *args, input=""))
    alone = _stats(d.cli("generate", "tiny", "ROMEO:", *args, input=""))
    assert both["prompt_tokens"] == joined["prompt_tokens"] > alone["prompt_tokens"]
    assert _stats(d.cli("run", "tiny", "ROMEO:", *args, input="First Citizen:\n"))["prompt_tokens"] \
        == joined["prompt_tokens"]


def test_i8_3_unknown_command_suggests():
    cmds = ["run", "ls", "rm", "import", "unload", "generate"]
    assert "did you mean 'run'" in suggest_command("rnu", cmds)
    assert "llmctl import FILE.gguf" in suggest_command("pull", cmds)
    assert "'llmctl ls'" in suggest_command("list", cmds)
    assert "'llmctl rm'" in suggest_command("rmi", cmds) and "'llmctl rm'" in suggest_command("remove", cmds)
    assert "'llmctl unload MODEL'" in suggest_command("stop", cmds)
    assert "llmosd" in suggest_command("serve", cmds)
    r = llmctl("pull", "smollm2")
    assert r.returncode == errors.EX_USAGE and "llmctl import" in r.stderr and "Traceback" not in r.stderr
    r = llmctl("genrate", "tiny", "hi")
    assert r.returncode == errors.EX_USAGE and "did you mean 'generate'" in r.stderr


def test_i8_3_tag_has_force():
    c = FakeClient()
    assert invoke(c, "tag", "a", "b", "--force").exit_code == 0 and c.calls[-1] == ("tag", "a", "b", True)
    assert invoke(c, "tag", "a", "b").exit_code == 0 and c.calls[-1] == ("tag", "a", "b", False)


# -- 8.5: progress --------------------------------------------------------------------------
def test_i8_5_progress_is_plain_lines_in_a_log_and_live_on_a_terminal():
    from llmctl.format import StatusLine
    log = io.StringIO()
    s = StatusLine(log, tty=False)
    for sent in range(0, 101, 5):
        s.update(f"model.gguf: {sent}% of 1 GB", sent / 100, key="model.gguf")
    s.done()
    s.update("store: writing 30 tensors")
    s.update("store: writing 30 tensors")
    s.done("imported x")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines == ["model.gguf: 0% of 1 GB", "model.gguf: 25% of 1 GB", "model.gguf: 50% of 1 GB",
                     "model.gguf: 75% of 1 GB", "model.gguf: 100% of 1 GB",
                     "store: writing 30 tensors", "imported x"]
    term = io.StringIO()
    s = StatusLine(term, tty=True)
    s.update("loading tiny...")
    s.clear()
    assert term.getvalue() == "\r\x1b[Kloading tiny...\r\x1b[K"
    quiet = io.StringIO()
    s = StatusLine(quiet, enabled=False)
    s.update("x")
    s.done("y")
    assert quiet.getvalue() == ""


def test_i8_5_import_load_and_cold_generate_report_progress(shared_daemon, tmp_path):
    d = shared_daemon
    d.cli("export", "tiny", str(tmp_path / "hf"))
    for name in ("config.json", "generation_config.json"):     # files of its own (digests)
        f = tmp_path / "hf" / name
        f.write_text(json.dumps({**json.loads(f.read_text()), "_test": "progress"}))
    r = d.cli("import", str(tmp_path / "hf"), "tiny-progress", "--force")
    assert "\r" not in r.stderr
    err = r.stderr.splitlines()
    assert any(ln.startswith("model.safetensors: 100%") or "already in the store" in ln for ln in err)
    assert any(ln.startswith("import: starting") for ln in err) and "imported tiny-progress" in r.stdout
    j = d.cli("import", str(tmp_path / "hf"), "tiny-progress", "--force", "--json")
    assert j.stderr == "" and json.loads(j.stdout)["model"] == "tiny-progress:latest"   # --json: clean
    r = d.cli("generate", "tiny-progress", "Hi", "--max-tokens", "2", "-v", input="")  # cold: a note
    assert "loading tiny-progress:latest..." in r.stderr and "loading" not in r.stdout
    r = d.cli("generate", "tiny-progress", "Hi", "--max-tokens", "2", "-v", input="")
    assert "loading" not in r.stderr.splitlines()[0]
    d.cli("unload", "tiny-progress")
    r = d.cli("load", "tiny-progress")
    assert r.stderr.startswith("loading tiny-progress...") and "instance" in r.stdout
    r = d.cli("load", "tiny-progress")
    assert "already loaded" in r.stdout                                               # 8.7
    d.cli("unload", "tiny-progress")
    d.cli("rm", "tiny-progress")


# -- 8.6: no tracebacks at the edges ----------------------------------------------------------
def test_i8_6_embed_missing_dir_no_traceback(shared_daemon, tmp_path):
    d = shared_daemon
    one_line_error(d.cli("embed", "tiny", "hello", "-o", str(tmp_path / "missing" / "v.npy"), check=False),
                   errors.EX_CANTCREAT)
    r = d.cli("embed", "tiny", "hello", "world", "-o", str(tmp_path / "vecs"))
    assert (tmp_path / "vecs").exists() and not (tmp_path / "vecs.npy").exists()
    assert f"to {tmp_path / 'vecs'}\n" in r.stderr
    import numpy as np
    assert np.load(tmp_path / "vecs").shape[0] == 2


def test_i8_6_export_unwritable_no_traceback(shared_daemon, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(shared_daemon.cli("export", "tiny", str(tmp_path / "file" / "out"), check=False),
                   errors.EX_CANTCREAT)


def test_i8_6_socket_plain_path_and_unix_url(shared_daemon):
    path = shared_daemon.sock[len("ipc://"):]
    for value in (path, "unix://" + path, os.path.relpath(path)):
        env = {**shared_daemon.env, "LLMOSD_SOCKET": value}
        assert llmctl("ps", "--json", env=env).returncode == 0, value
        env.pop("LLMOSD_SOCKET")
        assert llmctl("--socket", value, "ps", "--json", env=env).returncode == 0, value
    from llmctl import Client
    with Client("unix://" + path) as c:                  # the library takes them too
        assert c.ping()


def test_i8_6_bad_endpoints_are_one_line_errors(tmp_path):
    one_line_error(llmctl("--socket", "tcp://no host here:x", "ps"), errors.EX_UNAVAILABLE)
    one_line_error(llmctl("--socket", "bogus://x", "ps"), errors.EX_UNAVAILABLE)


def test_i8_6_oserror_and_zmqerror_are_one_line_sysexits(monkeypatch, capsys):
    import errno

    import zmq

    import llmctl.cli
    for exc, status in ((OSError(errno.EIO, "Input/output error", "/dev/x"), errors.EX_IOERR),
                        (zmq.ZMQError(errno.ECONNREFUSED), errors.EX_UNAVAILABLE),
                        (zmq.ZMQError(errno.EMSGSIZE), errors.EX_PROTOCOL)):
        class Failing(FakeClient):
            def ls(self):
                raise exc
        monkeypatch.setattr(llmctl.cli.common, "client", lambda ctx: Failing())
        assert llmctl.cli.main(["ls"]) == status
        err = capsys.readouterr().err
        assert err.startswith("llmctl: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_i8_6_seed_out_of_range(shared_daemon):
    for seed in (str(2**64), "-1"):
        r = shared_daemon.cli("generate", "tiny", "x", "--seed", seed, check=False, input="")
        assert r.returncode == errors.EX_USAGE and "Traceback" not in r.stderr and "--seed" in r.stderr
    r = shared_daemon.cli("generate", "tiny", "x", "--seed", str(2**64 - 1), "--max-tokens", "1", input="")
    assert r.returncode == 0


def test_i8_6_broken_pipe_exit_0(shared_daemon):
    p = subprocess.Popen([sys.executable, "-m", "llmctl.cli", "generate", "tiny", "Once",
                          "--max-tokens", "1500", "--temperature", "0"], env=shared_daemon.env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(20)                    # what `| head -c 20` does, then it goes away
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) == 0 and "Traceback" not in err and "Exception ignored" not in err, err


# -- 8.7: smaller things --------------------------------------------------------------------
def test_i8_7_ago_dst(monkeypatch):
    from llmctl.format import ago
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        ts = "2024-07-01T12:00:00Z"                           # DST in effect in New York
        t = calendar.timegm((2024, 7, 1, 12, 0, 0))
        assert ago(ts, now=t + 1) == "just now"
        assert ago(ts, now=t + 3600 + 5) == "1 hour ago"
        assert ago("2024-01-01T12:00:00Z", now=calendar.timegm((2024, 1, 1, 12, 10, 0))) == "10 minutes ago"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def _active(c):
    return sum(i["active_requests"] for i in c.ps())


def _wait_idle(c, timeout=10.0):
    deadline = time.monotonic() + timeout
    while _active(c) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _active(c)


def test_i8_7_generation_break_cancels(shared_daemon):
    with shared_daemon.client() as c:
        ref = c.generate("tiny", "Fast", max_tokens=20, temperature=0).text()
        gen = c.generate("tiny", "Once", max_tokens=1500, temperature=0)
        for _ in gen:
            break
        assert _wait_idle(c) == 0                      # the next request cancelled it
        assert c.generate("tiny", "Fast", max_tokens=20, temperature=0).text() == ref   # clean
        with pytest.raises(errors.Cancelled):
            next(gen)
        gen = c.generate("tiny", "Once", max_tokens=1500, temperature=0)
        next(gen)
        del gen                                            # dropped: cancelled at once
        with shared_daemon.client() as other:
            assert _wait_idle(other) == 0
        with c.generate("tiny", "Once", max_tokens=1500, temperature=0) as gen:
            next(gen)
        assert gen.stats is not None and gen.stats["finish_reason"].startswith("cancelled")
        assert c.generate("tiny", "Fast", max_tokens=20, temperature=0).text() == ref


def test_i8_7_unload_not_loaded_and_load_twice(shared_daemon):
    d = shared_daemon
    with d.client() as c:
        _wait_idle(c)                      # a cancelled stream of an earlier test may still end
    d.cli("unload", "tiny", check=False)
    r = d.cli("unload", "tiny")
    assert r.returncode == 0 and "tiny is not loaded" in r.stdout
    assert "already loaded" not in d.cli("load", "tiny").stdout
    assert "already loaded" in d.cli("load", "tiny").stdout
    r = invoke(FakeClient(), "unload", "m")
    assert r.exit_code == 0 and "m is not loaded" in r.output


def test_i8_7_logprobs_without_json_are_shown(shared_daemon):
    r = shared_daemon.cli("generate", "tiny", "ROMEO:", "--max-tokens", "4", "--temperature", "0",
                          "--logprobs", "2", "-v", input="")
    table = [ln for ln in r.stderr.splitlines() if ln.strip().startswith("-") or ln.strip().startswith("0")]
    assert "logprob" in r.stderr and len(table) == 4 and "[" in table[0]
    assert logprob_lines([{"logprobs": [{"id": 1, "token": "a", "logprob": -0.5,
                                         "top": [{"id": 1, "token": "a", "logprob": -0.5}]}]}]) == \
        ['   -0.5000  "a"   ["a" -0.5000]']


def test_i8_7_names_are_passed_as_typed(shared_daemon):
    c = FakeClient()
    assert invoke(c, "rm", " tiny ").exit_code == 0 and c.calls[-1] == ("rm", " tiny ")
    assert shared_daemon.cli("rm", " tiny ", check=False).returncode != 0
    assert "tiny:latest" in shared_daemon.cli("ls").stdout


# -- issue 7 --------------------------------------------------------------------------------
def test_i7_9_paused_reader_30s(shared_daemon):
    """A reader that pauses 30 s (past any ZMTP heartbeat timeout) neither aborts nor loses its
    generation: the daemon holds it back, and it completes when reading resumes."""
    code = ("import sys, time\n"
            "from llmctl import Client\n"
            "with Client(sys.argv[1]) as c:\n"
            "    g = c.generate('tiny', 'Once', max_tokens=1500, temperature=0)\n"
            "    next(g)\n"
            "    time.sleep(30)\n"
            "    g.text()\n"
            "    print(g.stats['finish_reason'], g.stats['generated_tokens'])\n")
    p = subprocess.run([sys.executable, "-c", code, shared_daemon.sock], capture_output=True,
                       text=True, timeout=120, env=shared_daemon.env)
    assert p.returncode == 0, (p.returncode, p.stderr)          # -6 was SIGABRT
    reason, n = p.stdout.split()
    assert reason in ("length", "stop", "context") and int(n) > 0


def test_i7_12_socket_permission_denied(tmp_path):
    from llmctl.access import socket_access_error
    st = os.stat_result
    dir_closed = st((0o40000 | 0o000, 0, 0, 0, 0, 0, 0, 0, 0, 0))        # root's, mode 000
    dir_group = st((0o40000 | 0o750, 0, 0, 0, 0, 123, 0, 0, 0, 0))       # root:123, 0750
    sock_660 = st((0o140000 | 0o660, 0, 0, 0, 0, 123, 0, 0, 0, 0))
    err = socket_access_error("/run/x/s.sock", 1000, {1000}, dir_closed, None)
    assert isinstance(err, errors.PermissionDenied) and err.exit_status == errors.EX_NOPERM
    assert "permission denied" in str(err) and "does not exist" not in str(err)
    assert isinstance(socket_access_error("/run/x/s.sock", 1000, {1000}, dir_group, sock_660),
                      errors.PermissionDenied)
    assert socket_access_error("/run/x/s.sock", 1000, {1000, 123}, dir_group, sock_660) is None
    assert socket_access_error("/run/x/s.sock", 0, {0}, dir_closed, sock_660) is None      # root
    assert isinstance(socket_access_error("/run/x/s.sock", 1000, {123}, dir_group, None),
                      errors.DaemonUnavailable)
    # end to end: as a normal user (root drops to nobody, as root passes every check)
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot act as a normal user")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(*args):
        return subprocess.run(prefix + [sys.executable, *args], cwd=root, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "LLMOSD_SOCKET": ""})
    if run("-c", "import llmctl.cli").returncode != 0:
        pytest.skip("a normal user cannot run this checkout's Python (its directory is private)")
    base = tempfile.mkdtemp()
    try:
        os.chmod(base, 0o755)
        closed = os.path.join(base, "closed")
        os.mkdir(closed, 0o000)
        os.chmod(closed, 0o000)
        r = run("-m", "llmctl.cli", "--socket", os.path.join(closed, "llmosd.sock"), "ps")
        assert r.returncode == errors.EX_NOPERM and "permission denied" in r.stderr, r.stderr
        assert "does not exist" not in r.stderr and "Traceback" not in r.stderr
        r = run("-m", "llmctl.cli", "--socket", os.path.join(base, "none.sock"), "ps")
        assert r.returncode == errors.EX_UNAVAILABLE and "does not exist" in r.stderr
    finally:
        os.chmod(os.path.join(base, "closed"), 0o700)
        shutil.rmtree(base)


def test_review_a_file_name_as_text_gets_a_note(shared_daemon, tmp_path):
    """score/classify/embed take TEXT arguments as text; one that names a file says how to send
    the file's content instead of silently scoring its name."""
    f = tmp_path / "p.txt"
    f.write_text("To be, or not to be\n")
    r = shared_daemon.cli("score", "tiny", str(f))
    assert "is used as the text itself" in r.stderr and f"- < {f}" in r.stderr
    r = shared_daemon.cli("score", "tiny", "-", input=f.read_text())
    assert "note:" not in r.stderr


def test_review_a_forced_unload_is_not_a_ctrl_c():
    """A request ended by someone else's forced unload exits 75 (try again), not 130."""
    assert errors.Cancelled("x").exit_status == errors.EX_TEMPFAIL == 75
