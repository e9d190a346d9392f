"""pagoda.engine.loader.gguf_file against gguf-py's own reader (the reference) on the demo GGUF and on
written files with every metadata value type, plus the errors a broken file gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize

from pagoda.engine.loader import demo_model_path
from pagoda.engine.loader.gguf_file import GgufFile


def _assert_same_as_reference(path: Path) -> None:
    ours, ref = GgufFile(path), GGUFReader(path)
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == ref_fields
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(b.shape.tolist()), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_demo_model_reads_like_gguf_py() -> None:
    path = Path(demo_model_path())
    _assert_same_as_reference(path)
    assert len(GgufFile(path).get("tokenizer.ggml.tokens")) == 49152


def _write(path: Path) -> None:
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint32("t.u32", 7)
    writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 0.5)
    writer.add_float64("t.f64", 0.25)
    writer.add_bool("t.bool", True)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.strs", ["a", "ß", ""])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((4, 64)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 64)).astype(np.float16))
    q = quantize(rng.standard_normal((8, 64)).astype(np.float32), GGMLQuantizationType.Q4_1)
    writer.add_tensor("q41", q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_every_value_type_and_tensor_kind(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path)
    _assert_same_as_reference(path)
    f = GgufFile(path)
    assert f.get("t.strs") == ["a", "ß", ""] and f.get("t.i64") == -(2**40) and f.get("t.bool") is True
    assert f.get("missing", 3) == 3


def test_broken_files_get_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "m.gguf"
    _write(good)
    data = good.read_bytes()
    bad_magic = tmp_path / "bad.gguf"
    bad_magic.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        GgufFile(bad_magic)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        GgufFile(truncated)
    old = tmp_path / "v1.gguf"
    old.write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    with pytest.raises(ValueError, match="version 1"):
        GgufFile(old)


def test_a_cut_header_is_a_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "m.gguf"
    _write(good)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:200])  # ends inside the metadata
    with pytest.raises(ValueError, match="truncated or corrupt"):
        GgufFile(cut)
