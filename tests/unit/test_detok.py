from llmosd.serve.detok import StopMatcher, StreamDecoder
from llmosd.models.tokenizer import SentencePieceTokenizer, train_sentencepiece
from conftest import SHAKESPEARE


def tok():
    return SentencePieceTokenizer(train_sentencepiece(SHAKESPEARE.read_text()[:200_000], 400))


def test_stream_decode_equals_full_decode_with_multibyte():
    t = tok()
    prompt = t.encode("Hello")
    text = " there, caf\u00e9 \U0001F600 done.\nNext line"
    ids = t.encode("Hello" + text)[len(prompt):]
    d = StreamDecoder(t, prompt)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == t.decode(prompt + ids)[len(t.decode(prompt)):]
    assert all("\ufffd" not in p for p in pieces)


def test_roundtrip_any_text():
    t = tok()
    for s in ["plain", "  two  spaces", "tabs\tand\nnewlines\n", "\u4e2d\u6587 \u00fc\u00df"]:
        assert t.decode(t.encode(s)) == s


def test_stop_matcher_holds_back_and_cuts():
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("X more") == ("ENX more", False)
    assert m.feed(" fin\n") == (" fin", False)
    assert m.feed("\nafter") == ("", True)
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)
    m = StopMatcher(["xyz"])
    assert m.feed("ab xy") == ("ab ", False) and m.flush() == "xy"
