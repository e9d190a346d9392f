"""Reasoning models (`--reasoning-parser`): the text between `<think>` and `</think>` is the
answer's `reasoning_content`, the rest its `content`, and a stream sends them apart.

- `deepseek_r1`: the template opens `<think>` in the prompt, so the answer starts inside its
  reasoning (an opening tag, when the model writes one, is skipped); everything before `</think>`
  is reasoning, and an answer that never closes it (cut by max_tokens) is all reasoning.
- `qwen3`: reasoning only when the answer opens with `<think>` (thinking can be switched off);
  otherwise it is all content.

Tool calls are read from the content (gateway/tools.py).
"""

from __future__ import annotations

from pagoda.services.gateway.tool_parsers import partial_tag_at

PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


def split_reasoning(text: str, parser: str, final: bool = True) -> tuple[str, str]:
    """(reasoning, content) of `text`. Unless `final`, a tail that may still become a tag is in
    neither (a stream holds it until more text comes), so both only ever grow."""
    if text.startswith(START):
        body = len(START)
    elif not final and START.startswith(text):  # "<thi": a <think> may be coming
        return "", ""
    elif parser == "qwen3":
        return "", text
    else:
        body = 0
    end = text.find(END, body)
    if end >= 0:
        return text[body:end], text[end + len(END) :]
    return text[body : len(text) if final else partial_tag_at(text, END, body)], ""
