"""Chat template rendering (llmosd.serve.chat) against transformers' own renderer."""
import pytest

from llmosd.serve.chat import TemplateError, check_messages, render

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
          "{% set messages = messages[1:] %}{% endif %}"
          "{% for message in messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
          "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_chatml_with_default_system_and_generation_prompt():
    out = render(CHATML, [{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_matches_transformers_renderer():
    transformers = pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    for tpl in (CHATML, LLAMA2):
        ours = render(tpl, msgs, bos_token="<s>", eos_token="</s>")
        ref = render_jinja_template(conversations=[msgs], chat_template=tpl, add_generation_prompt=True,
                                    bos_token="<s>", eos_token="</s>")[0][0]
        assert ours == ref


def test_template_errors_are_clear():
    with pytest.raises(TemplateError, match="must alternate"):
        render(LLAMA2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="no chat template"):
        render(None, [{"role": "user", "content": "a"}])
    with pytest.raises(TemplateError, match="does not compile"):
        render("{% for %}", [{"role": "user", "content": "a"}])


@pytest.mark.parametrize("bad", [[], "hi", [{"role": "user"}], [{"role": "robot", "content": "x"}],
                                 [{"role": "user", "content": 3}]])
def test_check_messages_refuses_bad_lists(bad):
    with pytest.raises(TemplateError):
        check_messages(bad)


def test_fit_drops_oldest_turns_keeping_system_and_last():
    from llmosd.serve.chat import fit
    msgs = [{"role": "system", "content": "s"}] + [
        {"role": r, "content": f"{r[0]}{i}"} for i in range(3) for r in ("user", "assistant")] + [
        {"role": "user", "content": "last"}]

    def length(m):                       # a message costs 10 "tokens"
        return 10 * len(m)
    out, dropped = fit(msgs, length, 45)
    assert out[0]["role"] == "system" and out[-1]["content"] == "last" and out[1]["role"] == "user"
    assert length(out) <= 45 and dropped == len(msgs) - len(out)
    assert [m["content"] for m in out] == ["s", "u2", "a2", "last"]
    same, none = fit(msgs, length, 1000)
    assert same == msgs and none == 0
    alone, _ = fit(msgs, length, 5)      # cannot fit: system and the last message remain
    assert [m["content"] for m in alone] == ["s", "last"]
