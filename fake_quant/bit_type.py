"""Integer grids for fake quantization.

A ``BitType`` is the integer range values are rounded onto: signed grids serve symmetric
quantization (zero point 0), unsigned grids serve asymmetric quantization (a zero point shifts the
range). Every width from 2 to 16 bits exists, int4 included, so a static A4 run has a grid to use.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_BITS = 2
MAX_BITS = 16


@dataclass(frozen=True)
class BitType:
    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    def __str__(self) -> str:
        return self.name


def get_bit_type(bits: int, symmetric: bool) -> BitType:
    """The grid a quantizer of ``bits`` uses: signed for symmetric, unsigned for asymmetric."""
    return BitType(bits, signed=symmetric)
