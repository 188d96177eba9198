import pytest

from fake_quant.bit_type import BitType, get_bit_type


@pytest.mark.parametrize("bits", range(2, 17))
def test_ranges_for_every_width(bits):
    s, u = BitType(bits, True), BitType(bits, False)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    assert s.qmax - s.qmin + 1 == u.qmax - u.qmin + 1 == 2**bits


def test_int4_exists_and_names():
    assert (BitType(4, True).qmin, BitType(4, True).qmax) == (-8, 7)
    assert get_bit_type(4, symmetric=False).name == "uint4"
    assert str(get_bit_type(8, symmetric=True)) == "int8"


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_out_of_range_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits must be in 2..16"):
        BitType(bits, True)
