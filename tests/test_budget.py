"""Budget syntax (every form, bad strings refused) and conversion to a byte cap."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from lwq.allocate import allocate
from lwq.allocate.budget import ACCEPTED, Budget, budget_bytes, fp16_bytes, in_budget_units, parse_budget
from lwq.allocate.types import Candidate, LayerCandidates
from lwq.errors import BadInput
from lwq.spec import make_spec


@dataclass
class L:
    numel: int


@pytest.mark.parametrize("text,kind,value", [
    ("3.25bit", "bpw", 3.25), ("3.25bpw", "bpw", 3.25), ("3bits", "bpw", 3.0), (" 2.5 BIT ", "bpw", 2.5),
    (".5bit", "bpw", 0.5), ("4GB", "bytes", 4e9), ("3.5GiB", "bytes", 3.5 * 2**30), ("500MB", "bytes", 5e8),
    ("1.2e9B", "bytes", 1.2e9), ("2e3kb", "bytes", 2e6), ("700MiB", "bytes", 700 * 2**20), ("12345B", "bytes", 12345),
    ("0.25x", "fraction", 0.25), ("1x", "fraction", 1.0),
])
def test_parse_accepted(text, kind, value):
    b = parse_budget(text)
    assert b.kind == kind
    assert b.value == pytest.approx(value)
    assert b.text == text.strip()


@pytest.mark.parametrize("text", ["", "   ", "abc", "-3bit", "0bit", "0x", "0GB", "3.25 bits per", "4XB", "nan",
                                  "inf", "nanbit", "infbit", "3.25", "bit", "3..2bit", "3.25bit4", "1e999bit",
                                  "64bit", "+3bit"])
def test_parse_refused(text):
    with pytest.raises(BadInput) as e:
        parse_budget(text)
    msg = str(e.value)
    assert "\n" not in msg
    assert ACCEPTED in msg


def test_budget_bytes_bpw_counts_only_quantized_weights():
    layers = [L(1000), L(3000)]
    assert budget_bytes(parse_budget("4bit"), layers, rest_bytes=10**6) == 2000  # rest does not count
    assert budget_bytes(parse_budget("3.25bit"), layers, 0) == int(3.25 * 4000 / 8)


def test_budget_bytes_total_subtracts_rest():
    layers = [L(10**6)]
    assert budget_bytes(parse_budget("1MB"), layers, rest_bytes=200_000) == 800_000
    assert budget_bytes(parse_budget("1MiB"), layers, rest_bytes=48_576) == 2**20 - 48_576
    with pytest.raises(BadInput, match="what stays unquantized"):
        budget_bytes(parse_budget("100kB"), layers, rest_bytes=200_000)


def test_budget_bytes_fraction_of_fp16():
    layers = [L(1000), L(1000)]
    rest = 1000
    fp16 = fp16_bytes(layers, rest)
    assert fp16 == 5000
    assert budget_bytes(parse_budget("0.5x"), layers, rest) == 2500 - rest
    assert budget_bytes(parse_budget("1x"), layers, rest) == 4000  # all-fp16 layers fit exactly


def test_in_budget_units_inverts_budget_bytes():
    layers = [L(4000)]
    rest = 1000
    for text, expect in (("3bit", "3.0000bit"), ("0.5x", "0.5000x")):
        b = parse_budget(text)
        assert in_budget_units(b, budget_bytes(b, layers, rest), layers, rest) == expect
    b = parse_budget("2.5kB")
    assert in_budget_units(b, budget_bytes(b, layers, rest), layers, rest) == "2.5kB"


def test_allocate_infeasible_budget_states_minimum_in_its_units():
    spec2, spec4 = make_spec(2, 128), make_spec(4, 128)
    layers = [LayerCandidates(f"l{i}", 800, (20, 40), (Candidate(spec2, 300, 5.0), Candidate(spec4, 500, 1.0)))
              for i in range(2)]
    with pytest.raises(BadInput) as e:
        allocate(layers, "2bit", solver="dp")  # 2 bit = 400 bytes, cheapest plan = 600 bytes = 3 bpw
    assert "3.0000bit" in str(e.value) and "600 bytes" in str(e.value)
    with pytest.raises(BadInput) as e:
        allocate(layers, Budget("fraction", 0.2, "0.2x", "x"), rest_bytes=200, solver="dp")
    assert f"{(600 + 200) / fp16_bytes(layers, 200):.4f}x" in str(e.value)
    ok = allocate(layers, "4bit", solver="dp")
    assert ok.total_bytes <= 800 and ok.index in ((1, 0), (0, 1))
