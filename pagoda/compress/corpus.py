"""The built-in text, split so that what `pagoda quantize` calibrates on is never what `pagoda eval
perplexity` scores: calibrating on the evaluation text would favour the calibrated methods (GPTQ,
AWQ, SmoothQuant) over RTN and flatter all of them.

Both parts come from the English help CPython ships in `pydoc_data/topics.py` (offline,
deterministic, always there), cut by topic in sorted-key order: the first half of the topics
("assert" .. "global", 39 of 79, 205k characters, about 50k tokens with the demo model's
tokenizer) is the evaluation text, the second half ("id-classes" .. "yield") the calibration
text, less every paragraph that the first half holds too: topics quote each other (169 of the
evaluation half's 624 paragraphs of 80 characters or more recur in the second half, "with" and
"context-managers" for one), so a cut by topic alone would not keep them apart. What remains is
211k characters, about 51k tokens; no line of 40 characters or more of the evaluation text's
first 16,000 characters (the 4,096 tokens `pagoda eval perplexity` scores by default) is in it.
Torch-free (the CLI parser imports its readers).
"""

from __future__ import annotations


def _topics() -> list[str]:
    """Every pydoc help topic's text, in sorted-key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _split() -> int:
    """The index of the first calibration topic."""
    return len(_topics()) // 2


def evaluation_text() -> str:
    """The first half of the pydoc topics (sorted keys), joined by blank lines."""
    return "\n\n".join(_topics()[: _split()])


def calibration_text() -> str:
    """The second half of the pydoc topics (sorted keys) without the paragraphs (blocks between
    blank lines, compared stripped) that `evaluation_text()` holds, joined by blank lines."""
    seen = {p.strip() for p in evaluation_text().split("\n\n")}
    second = "\n\n".join(_topics()[_split() :])
    return "\n\n".join(p for p in second.split("\n\n") if p.strip() not in seen)
