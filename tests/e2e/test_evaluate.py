"""score / embed / classify (llmosd.serve.evaluate) on a tiny random model, checked against plain
full forward passes."""
import math

import pytest
import torch

from conftest import SHAKESPEARE
import llmosd.serve.evaluate as evaluate
from llmosd.models.llama import Llama, LlamaConfig
from llmosd.models.tokenizer import SentencePieceTokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def mt():
    tok = SentencePieceTokenizer(train_sentencepiece(SHAKESPEARE.read_text()[:100_000], 400))
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = Llama(cfg)
    m.init_weights(seed=0)
    return m.eval(), tok


def test_score_equals_full_forward_and_chunking_does_not_matter(mt, monkeypatch):
    m, tok = mt
    text = "ROMEO: But soft, what light through yonder window breaks?"
    with torch.no_grad():
        r = evaluate.score(m, tok, "cpu", text=text)
        ids = tok.encode(text)
        lp = m(torch.tensor([ids]))[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        monkeypatch.setattr(evaluate, "CHUNK", 3)
        r3 = evaluate.score(m, tok, "cpu", text=text)
    assert [t["id"] for t in r["tokens"]] == ids and r["tokens"][0]["logprob"] is None
    assert r["logprob"] == pytest.approx(lp.sum().item(), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(-lp.mean().item()), rel=1e-5)
    assert r3["perplexity"] == pytest.approx(r["perplexity"], rel=1e-6)


def test_score_refuses_too_short_text(mt):
    m, tok = mt
    with pytest.raises(ValueError, match="at least two tokens"):
        evaluate.score(m, tok, "cpu", text="", add_bos=False)


def test_score_of_text_past_the_context_uses_half_overlapping_windows(mt):
    m, tok = mt                                       # context 256
    text = SHAKESPEARE.read_text()[:3000]
    ids = tok.encode(text)
    assert len(ids) > 600
    with torch.no_grad():
        r = evaluate.score(m, tok, "cpu", text=text)
        first = m(torch.tensor([ids[:256]]))[0, :-1].log_softmax(-1)
        second = m(torch.tensor([ids[128:384]]))[0, :-1].log_softmax(-1)
    lps = [t["logprob"] for t in r["tokens"]]
    assert r["scored_tokens"] == len(ids) - 1 and r["windows"] == math.ceil((len(ids) - 256) / 128) + 1
    assert lps[1:256] == pytest.approx(first.gather(1, torch.tensor(ids[1:256])[:, None])[:, 0].tolist(), abs=1e-4)
    # tokens 256..383 are scored in the second window, with tokens 128.. in view
    assert lps[256:384] == pytest.approx(second[127:].gather(1, torch.tensor(ids[256:384])[:, None])[:, 0].tolist(), abs=1e-4)


def test_embed_pooling_and_normalisation(mt):
    m, tok = mt
    with torch.no_grad():
        r = evaluate.embed(m, tok, "cpu", inputs=["hello there", "good night"], pooling="mean")
        raw = evaluate.embed(m, tok, "cpu", inputs=["hello there"], pooling="last", normalize=False)
        h = m.model.norm(m.hidden(torch.tensor([tok.encode("hello there")])))[0]
    import numpy as np
    v = np.frombuffer(r["data"], "<f4").reshape(r["count"], r["dim"])
    assert v.shape == (2, 64) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    want = (h.mean(0) / h.mean(0).norm()).numpy()
    assert np.allclose(v[0], want, atol=1e-5)
    assert np.allclose(np.frombuffer(raw["data"], "<f4"), h[-1].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        evaluate.embed(m, tok, "cpu", inputs=["x"], pooling="max")


def test_classify_batched_labels_equal_separate_passes(mt):
    m, tok = mt
    labels = ["comedy", "tragedy and woe", "history"]
    with torch.no_grad():
        r = evaluate.classify(m, tok, "cpu", inputs=["To be or not to be", "A merry jest"], labels=labels)
        prompt = evaluate.DEFAULT_CLASSIFY_TEMPLATE.replace("{labels}", ", ".join(labels)).replace("{text}", "To be or not to be")
        prefix = tok.encode(prompt)
        for lab in labels:
            ids = tok.encode(" " + lab, add_bos=False)
            x = torch.tensor([prefix + ids])
            lp = m(x)[0, len(prefix) - 1:-1].log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum()
            assert r["results"][0]["scores"][lab] == pytest.approx(lp.item(), rel=1e-4, abs=1e-4)
    assert len(r["results"]) == 2
    res = r["results"][0]
    assert res["label"] == max(res["scores"], key=res["scores"].get)
    assert sum(res["probs"].values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="{text}"):
        evaluate.classify(m, tok, "cpu", inputs=["x"], labels=["a", "b"], template="no slot")
    with pytest.raises(ValueError, match="two distinct"):
        evaluate.classify(m, tok, "cpu", inputs=["x"], labels=["a", "a"])


def test_i7_10_calls_abandon_between_windows_and_inputs_when_stopping(mt):
    """``should_stop`` is checked between score windows and between embed/classify inputs, so
    an engine that is stopping waits for one forward pass, not the whole call."""
    m, tok = mt
    calls = []

    def stop_after(n):
        def should_stop():
            calls.append(1)
            return len(calls) > n
        return should_stop
    text = SHAKESPEARE.read_text()[:3000]                        # several windows of 256
    with torch.no_grad():
        for fn, kw in ((evaluate.score, {"text": text}),
                       (evaluate.embed, {"inputs": ["a", "b", "c"]}),
                       (evaluate.classify, {"inputs": ["a", "b", "c"], "labels": ["x", "y"]})):
            calls.clear()
            with pytest.raises(evaluate.Stopped):
                fn(m, tok, "cpu", should_stop=stop_after(1), **kw)
            assert len(calls) == 2                                   # stopped at the second check
        assert evaluate.score(m, tok, "cpu", text=text, should_stop=lambda: False)["windows"] > 1


def test_i7_11_score_of_huge_text_refused_with_limit(shared_daemon, mt):
    """~1 MiB of text is far more tokens than one score reply may list: refused up front with
    the limit and the fix, and the daemon answers the next score as usual."""
    from llmctl import errors
    text = SHAKESPEARE.read_text()[:1 << 20]
    with shared_daemon.client() as c:
        with pytest.raises(errors.InvalidArgument) as e:
            c.score("tiny", text)
        assert f"at most {evaluate.MAX_SCORE_TOKENS:,} tokens" in str(e.value) and "split the text" in str(e.value)
        assert c.score("tiny", "ROMEO: But soft")["scored_tokens"] > 1
    # embed: a reply of vectors past MAX_EMBED_BYTES is refused before any forward pass
    m, tok = mt
    n = evaluate.MAX_EMBED_BYTES // (m.config.hidden_size * 4) + 1
    with pytest.raises(ValueError, match=f"embed at most {n - 1} inputs"):
        evaluate.embed(m, tok, "cpu", inputs=["x"] * n)
