"""Chat messages -> prompt text, with the model's own Jinja chat template, rendered the way
Hugging Face's ``apply_chat_template`` renders it (sandboxed Jinja, trim_blocks/lstrip_blocks,
``raise_exception``, ``tojson``, ``strftime_now``; ``add_generation_prompt`` set).

The rendered text already holds whatever BOS the template writes, so it is encoded without
adding another.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Callable

ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ValueError):
    """The messages cannot be rendered; the message says why (often the template's own words)."""


def check_messages(messages) -> list[dict]:
    """Validate a ``messages`` list from a request; raise TemplateError naming the bad entry."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError("messages must be a non-empty list of {role, content} maps")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError(f"messages[{i}] must be a map with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TemplateError(f"messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.exceptions import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except JinjaError as e:
        raise TemplateError(f"the model's chat template does not compile: {e}") from None


def render(template: str | None, messages: list[dict], *, bos_token: str | None = None,
           eos_token: str | None = None, add_generation_prompt: bool = True) -> str:
    if not template:
        raise TemplateError("this model has no chat template")
    from jinja2.exceptions import TemplateError as JinjaError
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token or "",
                                         eos_token=eos_token or "",
                                         add_generation_prompt=add_generation_prompt)
    except TemplateError:
        raise
    except (JinjaError, TypeError, ValueError, KeyError, IndexError) as e:
        raise TemplateError(f"the chat template failed on these messages: {e}") from None


def fit(messages: list[dict], length: Callable[[list[dict]], int], budget: int) -> tuple[list[dict], int]:
    """Drop the oldest turns until ``length(messages)`` (rendered prompt tokens) is at most
    ``budget``, as Ollama does for long chats: system messages and the last message always
    stay, and what remains starts with a user turn.  Returns (messages, how many dropped)."""
    msgs, dropped = list(messages), 0
    while length(msgs) > budget:
        turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
        if len(turns) <= 1:
            break                                   # the last message alone is too long
        del msgs[turns[0]]
        dropped += 1
        while True:                                 # start again at a user turn
            turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
            if len(turns) <= 1 or msgs[turns[0]]["role"] == "user":
                break
            del msgs[turns[0]]
            dropped += 1
    return msgs, dropped
