"""pack/unpack: exhaustive round trips, GPTQ's bit-stream layout, range errors."""
from __future__ import annotations

import pytest
import torch

from lwq.kernels.pack import pack, packed_len, unpack

WIDTHS = (2, 3, 4, 6, 8)


def reference_pack(values: list[int], bits: int) -> list[int]:
    """Independent bit-stream reference: value i at stream bits [i*bits, (i+1)*bits), 32-bit words."""
    stream = 0
    for i, v in enumerate(values):
        stream |= v << (i * bits)
    words = []
    for w in range(packed_len(len(values), bits)):
        u = (stream >> (32 * w)) & 0xFFFFFFFF
        words.append(u - (1 << 32) if u >= (1 << 31) else u)
    return words


@pytest.mark.parametrize("bits", WIDTHS)
def test_every_value_at_every_offset_round_trips(bits):
    # each of the 2**bits values at each of the 32 stream offsets (covers word-spanning 3/6-bit values)
    n = 32 * (1 << bits) + 7
    vals = torch.arange(n) % (1 << bits)
    q = torch.stack([vals, vals.flip(0)], dim=1)
    packed = pack(q, bits, dim=0)
    assert packed.dtype == torch.int32 and packed.shape == (packed_len(n, bits), 2)
    assert torch.equal(unpack(packed, bits, n, dim=0), q.to(torch.int32))


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 3), (192, 13), (3, 172)])
@pytest.mark.parametrize("dim", [0, 1])
def test_random_odd_shapes_both_dims(bits, shape, dim):
    g = torch.Generator().manual_seed(bits * 100 + shape[0] + dim)
    q = torch.randint(0, 1 << bits, shape, generator=g)
    packed = pack(q, bits, dim=dim)
    assert packed.shape[dim] == packed_len(shape[dim], bits)
    assert packed.shape[1 - dim] == shape[1 - dim]
    assert torch.equal(unpack(packed, bits, shape[dim], dim=dim), q.to(torch.int32))


@pytest.mark.parametrize("bits", WIDTHS)
def test_layout_matches_the_bit_stream_reference(bits):
    g = torch.Generator().manual_seed(bits)
    vals = torch.randint(0, 1 << bits, (45,), generator=g)
    assert pack(vals, bits).tolist() == reference_pack(vals.tolist(), bits)


def test_known_4bit_word():
    # GPTQ: value i of a word sits at bits 4i..4i+3 (little-endian nibbles)
    packed = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert packed.tolist() == [0x87654321 - (1 << 32)]


def test_3bit_value_spans_two_words():
    vals = torch.zeros(11, dtype=torch.int64)
    vals[10] = 0b111  # stream bits 30, 31 | 32
    packed = pack(vals, 3)
    assert packed.tolist() == [-(1 << 31) + (1 << 30), 1]


@pytest.mark.parametrize("bad", [-1, 16])
def test_out_of_range_values_refused(bad):
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([0, bad, 3]), 4)


@pytest.mark.parametrize("bits", [0, 17])
def test_invalid_widths_refused(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(torch.zeros(1, dtype=torch.int32), bits, 1)


def test_unpack_refuses_too_few_words():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(2, dtype=torch.int32), 3, 22)
