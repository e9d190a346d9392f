"""The built-in texts: `pagoda quantize --calibration builtin` never calibrates on what `pagoda
eval perplexity` scores (an overlap would favour the calibrated methods)."""

from __future__ import annotations

from pagoda.compress.calibration import calibration_text
from pagoda.load.perplexity import builtin_text


def _long_lines(text: str, length: int = 40) -> set[str]:
    return {line.strip() for line in text.split("\n") if len(line.strip()) >= length}


def test_calibration_text_shares_no_paragraph_with_the_evaluation_text() -> None:
    calibration, evaluation = calibration_text("builtin"), builtin_text()
    assert len(calibration) > 200_000 and len(evaluation) > 200_000
    evaluated = {p.strip() for p in evaluation.split("\n\n")}
    assert not [p for p in calibration.split("\n\n") if p.strip() in evaluated]
    # the 4,096 tokens `pagoda eval perplexity` scores by default: not a line of them is calibrated on
    assert not _long_lines(evaluation[:16_000]) & _long_lines(calibration)


def test_evaluation_text_starts_where_it_always_did() -> None:
    """The evaluation half begins with the first topics in key order, so the default 4,096 tokens
    (and every perplexity in docs/perf.md) are the ones scored before the split."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    assert builtin_text().startswith("\n\n".join(topics[k] for k in keys[:4]))
    assert topics[keys[-1]] not in builtin_text()
