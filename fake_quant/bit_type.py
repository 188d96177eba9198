"""Grids for fake quantization.

A ``BitType`` is the range values are rounded onto: signed grids serve symmetric quantization (zero
point 0), unsigned grids serve asymmetric quantization (a zero point shifts the range). Every integer
width from 2 to 16 bits exists, int4 included, so a static A4 run has a grid to use.

One floating-point grid exists too: ``e4m3`` (FP8 with 4 exponent and 3 mantissa bits, largest value
448, no infinities), the activation format of Hopper's FP8 tensor cores. It is symmetric only; values
are scaled by ``scale`` like an integer grid and then rounded to the nearest e4m3 number.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_BITS = 2
MAX_BITS = 16
FORMATS = ("int", "e4m3")
E4M3_MAX = 448.0


@dataclass(frozen=True)
class BitType:
    bits: int
    signed: bool
    fmt: str = "int"  # "int": integers qmin..qmax; "e4m3": the FP8 numbers in [-448, 448]

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown grid format {self.fmt!r}; use one of {FORMATS}")
        if self.fmt == "e4m3" and (self.bits != 8 or not self.signed):
            raise ValueError("the e4m3 grid is 8 bits and symmetric (signed)")

    @property
    def is_float(self) -> bool:
        return self.fmt != "int"

    @property
    def qmin(self) -> float:
        if self.is_float:
            return -E4M3_MAX
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> float:
        if self.is_float:
            return E4M3_MAX
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def name(self) -> str:
        if self.is_float:
            return f"fp8_{self.fmt}"
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    def __str__(self) -> str:
        return self.name


def get_bit_type(bits: int, symmetric: bool, fmt: str = "int") -> BitType:
    """The grid a quantizer of ``bits`` uses: signed for symmetric, unsigned for asymmetric; ``fmt="e4m3"``
    for FP8 (8 bits, symmetric)."""
    if fmt == "e4m3" and not symmetric:
        raise ValueError("FP8 (e4m3) activations are symmetric: drop --a_asym")
    return BitType(bits, signed=symmetric, fmt=fmt)
