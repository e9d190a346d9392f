"""`pagoda quantize`'s scheme names and the group-size check's advice."""

from __future__ import annotations

import pytest

from pagoda.compress.scheme import SCHEMES, check_group_size, parse_scheme


def test_schemes_as_named() -> None:
    w4, w8, w8a8, fp8 = (parse_scheme(n) for n in ("W4A16", "w8a16", "W8A8", "FP8_DYNAMIC"))
    assert (w4.bits, w4.group_size, w4.symmetric, w4.act) == (4, 128, True, None)
    assert (w8.bits, w8.group_size, w8.act) == (8, None, None)
    assert (w8a8.bits, w8a8.group_size, w8a8.act, w8a8.float_codes) == (8, None, "int8", False)
    assert (fp8.group_size, fp8.act, fp8.float_codes) == (None, "fp8", True)
    asym = parse_scheme("w4a16_asym")  # LLM Compressor's preset: int4, group 128, zero points
    assert (asym.bits, asym.group_size, asym.symmetric, asym.act) == (4, 128, False, None)
    assert {parse_scheme(n).observer for n in SCHEMES} == {"minmax"}
    assert parse_scheme("W4A16", 64, "mse").observer == "mse"
    with pytest.raises(ValueError, match="unknown observer 'l2'; use one of minmax, mse"):
        parse_scheme("W4A16", 64, "l2")
    sparse = parse_scheme("2:4")
    assert sparse.sparse_24 and not sparse.quantizes_weights
    assert not any(SCHEMES[n].sparse_24 for n in SCHEMES if n != "2:4")


def test_group_size_replaces_the_default_where_groups_exist() -> None:
    assert parse_scheme("W4A16", 32).group_size == 32
    assert parse_scheme("W8A16", 64).group_size == 64
    assert parse_scheme("W4A16_ASYM", 64).group_size == 64
    for name in ("W8A8", "FP8_DYNAMIC", "2:4"):
        with pytest.raises(ValueError, match=f"scheme {name} takes no group size"):
            parse_scheme(name, 128)
    with pytest.raises(ValueError, match="must be positive"):
        parse_scheme("W4A16", 0)


def test_unknown_scheme_names_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="'W3A16'; valid schemes: W4A16, W4A16_ASYM, W8A16, W8A8, FP8_DYNAMIC, 2:4"
    ):
        parse_scheme("W3A16")


def test_check_group_size_suggests_divisors() -> None:
    scheme = parse_scheme("W4A16")
    check_group_size(scheme, 4096, "q_proj")  # divides: no error
    check_group_size(parse_scheme("W8A8"), 577, "odd")  # per channel: any width
    with pytest.raises(ValueError) as err:
        check_group_size(scheme, 576, "model.layers.0.mlp.down_proj")
    assert str(err.value) == (
        "group size 128 does not divide layer model.layers.0.mlp.down_proj's 576 inputs; "
        "use one of 32, 64, 96, 192"
    )
    for size in (32, 64, 96, 192):
        assert 576 % size == 0
    with pytest.raises(ValueError, match="use one of 10, 20, 25, 50"):
        check_group_size(parse_scheme("W4A16", 16), 100, "narrow")
