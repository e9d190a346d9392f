"""`pagoda models`: every catalog entry says its quantized form, and the demo's claim is the file's."""

from __future__ import annotations

from collections import Counter

from pagoda.engine.loader import demo_model_path
from pagoda.engine.loader.catalog import CATALOG, QUANTIZE_HOWTO, format_catalog
from pagoda.engine.loader.gguf_file import GgufFile


def test_every_entry_shows_its_quantized_form_or_how_to_make_one() -> None:
    text = format_catalog()
    rows = {e.name: next(line for line in text.splitlines() if line.startswith(e.name)) for e in CATALOG}
    for entry in CATALOG:
        if entry.source == "demo":
            assert "Q4_1 (served quantized)" in rows[entry.name]
        else:
            assert entry.quantized == "" and "W4A16 via pagoda quantize" in rows[entry.name], rows[entry.name]
    assert QUANTIZE_HOWTO == "pagoda quantize <id> --scheme W4A16 --method gptq --output <dir>"
    assert QUANTIZE_HOWTO in text


def test_demo_quantized_form_is_the_ggufs_weight_type() -> None:
    (demo,) = [e for e in CATALOG if e.source == "demo"]
    gguf = GgufFile(demo_model_path())
    matrices = Counter(t.tensor_type.name for t in gguf.tensors if len(t.shape) == 2)
    assert demo.quantized.split()[0] == matrices.most_common(1)[0][0], matrices
