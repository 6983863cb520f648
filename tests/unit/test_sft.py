"""Issue 11: fine-tuning data (``train.sft``, torch-free): JSONL examples parsed with their line
numbers, the loss mask (only completion / assistant tokens trained), the seeded split, batches
as a pure function of the step, and the evaluation metrics."""
from __future__ import annotations

import json

import pytest

from conftest import train_bpe
from llmosd.models.tokenizer import HFTokenizer, SentencePieceTokenizer, hf_bundle, train_sentencepiece
from llmosd.train import sft
from llmosd.train.sft import Example

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVO = [{"role": "system", "content": "You are a terse assistant."},
         {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy, my good friend?"},
         {"role": "assistant", "content": "Rome, of course."}]


def jsonl(*objs) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer with ChatML specials (<|im_end|> its EOS) and the template."""
    tk = train_bpe()
    return HFTokenizer(hf_bundle(tk.to_str(), {"chat_template": CHATML, "eos_token": "<|im_end|>"}, {}))


@pytest.fixture(scope="module")
def sp():
    text = "\n".join(m["content"] for m in CONVO) * 20 + "\nthe quick brown fox jumps over the lazy dog\n" * 50
    return SentencePieceTokenizer(train_sentencepiece(text, 320, 0, "bpe"))


def runs(ids, mask):
    """Maximal runs of equal mask value: [(mask value, ids)]."""
    out = []
    for i, m in zip(ids, mask):
        if out and out[-1][0] == m:
            out[-1][1].append(i)
        else:
            out.append((m, [i]))
    return out


# ---- parsing ---------------------------------------------------------------------------------

def test_i11_parse_examples_reads_each_kind_in_file_name_order():
    chat = sft.parse_examples({"b.jsonl": jsonl({"messages": CONVO[1:3], "id": 7}),
                               "a.jsonl": b"\n" + jsonl({"messages": CONVO})})
    assert [e.where for e in chat] == ["a.jsonl line 2", "b.jsonl line 1"]
    assert chat[0].kind == "chat" and chat[0].messages[-1] == {"role": "assistant", "content": "Rome, of course."}
    c = sft.parse_examples({"t.jsonl": jsonl({"prompt": "2+2=", "completion": "4"})})[0]
    assert (c.kind, c.prompt, c.completion) == ("completion", "2+2=", "4")
    t = sft.parse_examples({"t.jsonl": jsonl({"text": "hello"})})[0]
    assert (t.kind, t.text, t.label) == ("text", "hello", None)
    lb = sft.parse_examples({"t.jsonl": jsonl({"text": "good", "label": "pos"}, {"text": "x", "label": 0})})
    assert [(e.kind, e.label) for e in lb] == [("label", "pos"), ("label", "0")]
    assert sft.dataset_kind(lb) == "label"


@pytest.mark.parametrize("data, message", [
    ({"train.jsonl": b'{"text": "a"}\n\n{"text": "b"\n'}, r"train.jsonl line 3: not valid JSON"),
    ({"notes.txt": b"just some text\n"}, r"notes.txt line 1: not valid JSON .*JSONL .*llmctl train"),
    ({"t.jsonl": b'["a"]\n'}, r"t.jsonl line 1: each line must be a JSON object"),
    ({"t.jsonl": jsonl({"prompt": "a"})}, r"t.jsonl line 1: a line must be one of .* has prompt"),
    ({"t.jsonl": jsonl({"label": "a"})}, r"t.jsonl line 1: a line must be one of"),
    ({"t.jsonl": jsonl({"prompt": "a", "completion": ""})}, r"line 1: \"completion\" is empty"),
    ({"t.jsonl": jsonl({"prompt": 1, "completion": "b"})}, r"line 1: \"prompt\" must be a string"),
    ({"t.jsonl": jsonl({"text": "a", "label": ""})}, r"line 1: \"label\" must be a non-empty string"),
    ({"t.jsonl": jsonl({"messages": CONVO[:2]})}, r"line 1: the last message must be the assistant's"),
    ({"t.jsonl": jsonl({"messages": [{"role": "robot", "content": "x"}]})}, r"line 1: messages\[0\] has role"),
    ({"t.jsonl": jsonl({"messages": []})}, r"line 1: messages must be a non-empty list"),
    ({"a.jsonl": jsonl({"text": "a"}), "b.jsonl": jsonl({"text": "b"}, {"prompt": "p", "completion": "c"})},
     r"b.jsonl line 2: a prompt/completion example, but .* text examples \(from a.jsonl line 1\)"),
    ({"t.jsonl": b"\n  \n"}, r"hold no examples"),
    ({}, r"no data files"),
    ({"t.jsonl": b"\xff\xfe"}, r"t.jsonl is not UTF-8"),
])
def test_i11_parse_examples_refuses_bad_lines_with_their_number(data, message):
    with pytest.raises(ValueError, match=message):
        sft.parse_examples(data)


def test_i11_split_examples_is_seeded_and_holds_out_a_tenth():
    exs = [Example("text", text=str(i)) for i in range(25)]
    train, val = sft.split_examples(exs, 3, None)
    assert len(val) == 2 and len(train) == 23 and sorted(train + val, key=lambda e: int(e.text)) == exs
    assert sft.split_examples(exs, 3, None) == (train, val)
    assert sft.split_examples(exs, 4, None) != (train, val)
    assert [e.text for e in train] == sorted((e.text for e in train), key=int)     # data order kept
    assert len(sft.split_examples(exs[:2], 0, None)[1]) == 1
    assert sft.split_examples(exs[:1], 0, exs[1:3]) == (exs[:1], exs[1:3])
    with pytest.raises(ValueError, match="needs at least 2"):
        sft.split_examples(exs[:1], 0, None)


# ---- masks -----------------------------------------------------------------------------------

def test_i11_chat_segments_cut_the_rendering_at_the_assistant_turns():
    segs = sft.chat_segments(CHATML, CONVO)
    assert "".join(t for t, _ in segs) == sft.render(CHATML, CONVO, add_generation_prompt=False)
    assert [t for t, a in segs if a] == ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"]
    assert segs[0] == ("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n"
                       "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n", False)
    bos = "{{ bos_token }}" + CHATML
    assert sft.chat_segments(bos, CONVO[1:3], bos_token="<s>")[0][0].startswith("<s><|im_start|>user")


def test_i11_chat_segments_refuse_a_template_that_is_not_prefix_stable():
    odd = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match="cannot be told apart"):
        sft.chat_segments(odd, CONVO)


def test_i11_5_chat_sft_masks_everything_but_assistant_tokens(bpe):
    ex = sft.parse_examples({"chat.jsonl": jsonl({"messages": CONVO})})[0]
    ids, mask = sft.encode(bpe, ex, max_len=4096)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    parts = runs(ids, mask)
    trained = [bpe.decode(r) for m, r in parts if m]
    rest = [bpe.decode(r) for m, r in parts if not m]
    # the masked-in tokens: exactly each assistant answer, then the template's end of turn
    assert trained == ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"]
    # the masked-out ones: system and user turns, each ending with the generation prompt
    assert rest == ["<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n"
                    "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                    "<|im_start|>user\nAnd of Italy, my good friend?<|im_end|>\n<|im_start|>assistant\n"]
    assert bpe.decode(ids) == sft.render(CHATML, CONVO, add_generation_prompt=False)
    im_end = bpe.tk.token_to_id("<|im_end|>")
    assert [m for i, m in zip(ids, mask) if i == im_end] == [0, 0, 1, 0, 1]   # system/user ends untrained
    # the generation prompt of an evaluation is the masked-out text before the last answer
    prompt, gold = sft.generation_prompt(bpe, ex)
    assert gold == "Rome, of course." and bpe.decode(prompt) == rest[0] + trained[0] + rest[1]


def test_i11_chat_mask_with_a_sentencepiece_tokenizer_and_a_bos_template(sp):
    tmpl = "{{ bos_token }}" + CHATML
    ex = Example("chat", messages=tuple(CONVO[1:3]))
    ids, mask = sft.encode(sp, ex, max_len=4096, template=tmpl)
    segs = sft.chat_segments(tmpl, CONVO[1:3], bos_token="<s>", eos_token="</s>")
    assert ids[0] == sp.bos_id and mask[0] == 0                 # the template's BOS, once
    assert ids == [i for t, _ in segs for i in sp.encode(t, add_bos=False)]
    assert [i for i, m in zip(ids, mask) if m] == sp.encode("Paris.<|im_end|>\n", add_bos=False)


def test_i11_completion_text_and_label_masks(sp):
    ex = Example("completion", prompt="the quick brown", completion=" fox")
    ids, mask = sft.encode(sp, ex, max_len=100)
    p = sp.encode("the quick brown", add_bos=True)
    c = sp.encode(" fox", add_bos=False)
    assert ids == p + c + [sp.eos_id] and mask == [0] * len(p) + [1] * (len(c) + 1)
    assert sft.encode(sp, ex, max_len=len(p) + 1) == (ids[:len(p) + 1], mask[:len(p) + 1])
    assert sft.generation_prompt(sp, ex) == (p, " fox")
    ids, mask = sft.encode(sp, Example("text", text="the lazy dog"), max_len=100)
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id and mask == [0] + [1] * (len(ids) - 1)
    ids, mask = sft.encode(sp, Example("label", text="the lazy dog", label="a"), max_len=100)
    assert ids == sp.encode("the lazy dog") and mask == [0] * len(ids)
    with pytest.raises(ValueError, match="no answer to generate"):
        sft.generation_prompt(sp, Example("text", text="x"))


# ---- batches ---------------------------------------------------------------------------------

def test_i11_steps_for_counts_whole_batches():
    assert sft.steps_for(100, 1, 8, 1, 1) == 13
    assert sft.steps_for(100, 2, 8, 2, 2) == 7
    assert sft.steps_for(96, 1, 8, 1, 1) == 12
    assert sft.steps_for(3, 0.1, 8, 1, 1) == 1


def test_i11_batch_indices_are_pure_epoch_shuffles():
    n, b, ga = 23, 4, 2
    seq = [i for step in range(12) for micro in range(ga) for i in sft.batch_indices(n, b, 5, step, micro, ga)]
    for e in range(len(seq) // n):                       # every example once per epoch
        assert sorted(seq[e * n:(e + 1) * n]) == list(range(n))
    assert seq[:n] != seq[n:2 * n] and seq[:n] != list(range(n))
    assert sft.batch_indices(n, b, 5, 7, 1, ga) == sft.batch_indices(n, b, 5, 7, 1, ga)   # resume
    assert sft.batch_indices(n, b, 6, 0, 0, ga) != sft.batch_indices(n, b, 5, 0, 0, ga)
    # 3 ranks of batch b see what one process of batch 3*b sees
    for step in range(4):
        for micro in range(ga):
            ranks = [i for r in range(3) for i in sft.batch_indices(n, b, 5, step, micro, ga, r, 3)]
            assert ranks == sft.batch_indices(n, 3 * b, 5, step, micro, ga)


# ---- metrics ---------------------------------------------------------------------------------

PRED = ["a", "a", "b", "c", "a", "b", "b"]
GOLD = ["a", "b", "b", "c", "c", "b", "a"]


def test_i11_accuracy_and_macro_f1_by_hand():
    assert sft.accuracy(PRED, GOLD) == pytest.approx(4 / 7)
    # a: tp 1 fp 2 fn 1 -> 2/5; b: tp 2 fp 1 fn 1 -> 4/6; c: tp 1 fp 0 fn 1 -> 2/3; d: 0
    assert sft.macro_f1(PRED, GOLD, ["a", "b", "c"]) == pytest.approx((2 / 5 + 4 / 6 + 2 / 3) / 3)
    assert sft.macro_f1(PRED, GOLD, ["a", "b", "c", "d"]) == pytest.approx((2 / 5 + 4 / 6 + 2 / 3) / 4)
    assert sft.macro_f1(GOLD, GOLD, ["a", "b", "c"]) == 1.0 and sft.accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        sft.accuracy(["a", "b"], ["a"])


def test_i11_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    for labels in (["a", "b", "c"], ["a", "b", "c", "d"]):
        assert sft.macro_f1(PRED, GOLD, labels) == pytest.approx(
            metrics.f1_score(GOLD, PRED, labels=labels, average="macro", zero_division=0))


def test_i11_exact_match_and_chrf_match_sacrebleu():
    from sacrebleu.metrics import CHRF
    pred = ["Le chat est sur le tapis. ", "Bonjour", "il pleut"]
    gold = ["Le chat est sur le tapis.", "Bonsoir", "il pleut beaucoup"]
    assert sft.exact_match(pred, gold) == pytest.approx(1 / 3)
    assert sft.chrf(pred, gold) == pytest.approx(CHRF().corpus_score(pred, [gold]).score)
    assert sft.chrf(gold, gold) == pytest.approx(100.0) and sft.chrf([], []) == 0.0
