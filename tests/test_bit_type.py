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


# ---- the FP8 (e4m3) grid ------------------------------------------------------------------------------
def e4m3_values():
    """Every finite non-negative e4m3 number from the format's definition (OCP FP8: exponent bias 7, three
    mantissa bits, subnormals at exponent 0, the all-ones code is NaN), with its mantissa's last bit."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals.append((v, m & 1))
    return vals


def nearest_e4m3(x: float) -> float:
    """Round to the nearest e4m3 number, ties to the even mantissa, saturating at 448."""
    vals = e4m3_values()
    mag = min(abs(x), 448.0)
    best = min(vals, key=lambda vm: (abs(vm[0] - mag), vm[1]))
    return best[0] if x >= 0 else -best[0]


def test_e4m3_grid_from_its_definition():
    import torch

    from fake_quant.qparams import quantize_to_int

    bt = get_bit_type(8, True, "e4m3")
    assert (bt.qmin, bt.qmax, bt.name, bt.is_float) == (-448.0, 448.0, "fp8_e4m3", True)
    vals = sorted(v for v, _ in e4m3_values())
    assert len(vals) == 127 and vals[-1] == 448.0
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]  # exact ties: the even mantissa wins
    g = torch.Generator().manual_seed(0)
    xs = [*vals, *mids, *(torch.randn(400, generator=g) * 60).tolist(), 500.0, -1000.0, 1e-4, -3e-3]
    x = torch.tensor(xs + [-v for v in xs], dtype=torch.float64).float()
    scale, zero = torch.tensor(0.5), torch.tensor(0.0)
    got = quantize_to_int(x, scale, zero, bt)
    want = torch.tensor([nearest_e4m3(v) for v in (x / scale).tolist()])
    assert torch.equal(got, want)


def test_e4m3_grid_is_symmetric_8_bit_only():
    with pytest.raises(ValueError, match="drop --a_asym"):
        get_bit_type(8, False, "e4m3")
    with pytest.raises(ValueError, match="8 bits"):
        BitType(4, True, "e4m3")
    with pytest.raises(ValueError, match="unknown grid format"):
        BitType(8, True, "e5m2")
