import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.core.packing import (
    decode_gaps,
    encode_gaps,
    pack_bits,
    pack_codes,
    unpack_bits,
    unpack_codes,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_bits_round_trip(values):
    mask = torch.tensor(values, dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.numel() == (len(values) + 7) // 8
    assert torch.equal(unpack_bits(packed, len(values)), mask)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 5000), max_size=200))
def test_gaps_round_trip(positions):
    pos = torch.tensor(sorted(positions), dtype=torch.int64)
    stream = encode_gaps(pos)
    assert torch.equal(decode_gaps(stream, len(positions)), pos)


def test_gap_stream_is_one_byte_per_small_gap():
    pos = torch.arange(0, 1000, 10)
    assert encode_gaps(pos).numel() == 100
    assert encode_gaps(torch.tensor([600])).tolist() == [255, 255, 90]


def test_decoding_a_wrong_stream_raises():
    with pytest.raises(ValueError, match="index stream holds 2 positions, expected 3"):
        decode_gaps(encode_gaps(torch.tensor([1, 5])), 3)
    with pytest.raises(ValueError, match="index stream"):
        decode_gaps(torch.tensor([3, 255], dtype=torch.uint8), 1)  # trailing partial gap


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([2, 3, 4, 5, 8]), st.data())
def test_codes_round_trip(bits, data):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = data.draw(st.lists(st.integers(lo, hi), max_size=100))
    codes = torch.tensor(values, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    unpacked = unpack_codes(packed, bits, len(values))
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, codes.to(torch.int8))


def test_code_density():
    codes = torch.zeros(100, dtype=torch.int32)
    assert (
        pack_codes(codes, 2).numel() == 25
        and pack_codes(codes, 4).numel() == 50
        and pack_codes(codes, 8).numel() == 100
    )
