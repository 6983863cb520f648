"""Inference verbs through the real daemon on the session's tiny model: sampling settings,
logprobs, score and their errors (the SmolLM2 tests cover chat, classify, embed on a real model)."""
import json

import torch

from llmctl import errors


def _reference(daemon, prompt, n, penalty):
    """Greedy with HF's repetition penalty, full forward passes, straight from the store."""
    from llmosd.models.loader import load_model
    from llmosd.store.store import Store
    store = Store(str(daemon.state / "store"))
    _, man, _ = store.get("tiny")
    model, tok = load_model(store, man, torch.device("cpu"))
    seq = tok.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seen = torch.tensor(seq)
            got = logits[seen]
            logits[seen] = torch.where(got > 0, got / penalty, got * penalty)
            nxt = int(logits.argmax())
            if nxt in tok.eos_ids():
                break
            out.append(nxt)
            seq.append(nxt)
    return out, model, tok


def test_repetition_penalty_and_logprobs_through_the_daemon(shared_daemon):
    with shared_daemon.client() as c:
        g = c.generate("tiny", "First Citizen:", max_tokens=20, temperature=0, repetition_penalty=1.5,
                       logprobs=3)
        g.text()
    ids = [t for ch in g.chunks for t in ch["token_ids"]]
    ref, model, tok = _reference(shared_daemon, "First Citizen:", 20, 1.5)
    assert ids == ref
    lps = [lp for ch in g.chunks for lp in ch["logprobs"]]
    assert [lp["id"] for lp in lps] == ids and all(len(lp["top"]) == 3 for lp in lps)
    # the first token's logprob is the model's own distribution at the prompt's end
    with torch.no_grad():
        want = model(torch.tensor([tok.encode("First Citizen:")]))[0, -1].log_softmax(-1)
    assert abs(lps[0]["logprob"] - want[ids[0]].item()) < 1e-4
    assert lps[0]["top"][0]["logprob"] >= lps[0]["top"][1]["logprob"]


def test_min_p_json_and_cli_flags(shared_daemon):
    r = shared_daemon.cli("generate", "tiny", "ROMEO:", "--max-tokens", "8", "--min-p", "0.2", "--seed", "3",
                          "--json", "--logprobs", "2")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[-1]["done"] and all("logprobs" in ln for ln in lines[:-1])


def test_bad_settings_and_verbs_get_clear_errors(shared_daemon):
    cases = [
        (("generate", "tiny", "hi", "--chat"), errors.EX_DATAERR, "no chat template"),
        (("generate", "tiny", "hi", "--min-p", "1.5"), errors.EX_DATAERR, "min_p"),
        (("generate", "tiny", "hi", "--repetition-penalty", "0"), errors.EX_DATAERR, "repetition_penalty"),
        (("score", "tiny", "", "--no-bos"), errors.EX_DATAERR, "at least two tokens"),
        (("classify", "tiny", "x", "--labels", "one"), errors.EX_USAGE, "at least two"),
        (("score", "nosuch", "text"), errors.EX_NOINPUT, "nosuch"),
    ]
    for args, code, needle in cases:
        r = shared_daemon.cli(*args, check=False)
        assert r.returncode == code and needle in r.stderr, (args, r.returncode, r.stderr)
    assert shared_daemon.cli("status").returncode == 0       # and the daemon carries on


def test_score_through_the_daemon_equals_forward(shared_daemon):
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    r = json.loads(shared_daemon.cli("score", "tiny", text, "--json").stdout)
    _, model, tok = _reference(shared_daemon, "x", 0, 1.0)
    ids = tok.encode(text)
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])
    assert abs(r["logprob"] - lp.sum().item()) < 1e-3
    out = shared_daemon.cli("score", "tiny", text).stdout
    assert "perplexity" in out.splitlines()[-1]


def test_download_only_serves_blobs_of_models(shared_daemon):
    with shared_daemon.client() as c:
        try:
            c.download("sha256:" + "0" * 64, 0, 10)
            raise AssertionError("served an unknown blob")
        except errors.ModelNotFound as e:
            assert "no model in the store refers to" in str(e)
