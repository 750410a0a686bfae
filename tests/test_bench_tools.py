"""Argument parsing of the GPU-only benchmark tools (their runs need a device; their inputs are checked here)."""

from __future__ import annotations

import pytest

from benchmarks.ncu_decode import parse_case


def test_ncu_decode_case_parsing():
    assert parse_case("mla:16:64:8192:64:fp8") == ("mla", 16, 64, 8192, 64, "fp8")
    with pytest.raises(SystemExit, match="variant:h_q:B:L:page:kv"):
        parse_case("mla:16:64")
    with pytest.raises(SystemExit, match="must be integers"):
        parse_case("mla:x:64:8192:64:bf16")
    with pytest.raises(SystemExit, match="kv must be bf16 or fp8"):
        parse_case("mla:16:64:8192:64:int4")
