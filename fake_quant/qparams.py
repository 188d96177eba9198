"""Granularities, quantization parameters and the fake-quantize arithmetic shared by all quantizers.

Every tensor is seen as a 2-D matrix ``[rows, cols]`` whose columns are its last dimension:
a weight ``[out_features, in_features]`` or an activation ``[tokens, hidden]``.

* ``TENSOR``: one scale for the whole matrix.
* ``ROW``:    one scale per row: per output channel of a weight, per token of an activation.
* ``COLUMN``: one scale per column: per input channel of an activation.
* ``GROUP``:  one scale per row and per block of ``group_size`` consecutive columns.

Statistics are reduced over a "sample" axis; the remaining axes are the *positions* that each
get their own scale (``()`` for TENSOR, ``(rows,)`` for ROW, ``(cols,)`` for COLUMN and
``(rows, cols // group_size)`` for GROUP).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .bit_type import BitType

# Smallest scale we allow: a range of exactly zero (an all-zero tensor) would otherwise divide by 0.
MIN_SCALE = 1e-10


class Granularity(str, enum.Enum):
    TENSOR = "tensor"
    ROW = "row"
    COLUMN = "column"
    GROUP = "group"

    @classmethod
    def parse(cls, value: "str | Granularity") -> "Granularity":
        if isinstance(value, Granularity):
            return value
        aliases = {
            "tensor": cls.TENSOR, "per_tensor": cls.TENSOR,
            "row": cls.ROW, "token": cls.ROW, "per_token": cls.ROW,
            "column": cls.COLUMN, "channel": cls.COLUMN, "per_channel": cls.COLUMN,
            "group": cls.GROUP, "per_group": cls.GROUP,
        }
        try:
            return aliases[str(value).lower()]
        except KeyError:
            raise ValueError(
                f"unknown granularity {value!r}; use one of {sorted(aliases)}"
            ) from None


@dataclass
class QParams:
    """Scale and zero point, shaped like the positions of a granularity (see module doc)."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def to(self, device: torch.device | str) -> "QParams":
        return QParams(self.scale.to(device), self.zero_point.to(device))


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """View any tensor as ``[rows, cols]`` with cols = last dimension."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


def check_group_size(cols: int, group_size: int | None) -> int:
    if group_size is None or group_size <= 0:
        raise ValueError(f"GROUP granularity needs a positive group_size, got {group_size}")
    if cols % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the last dimension {cols}; "
            "pick a group size that divides it"
        )
    return group_size


def sample_view(x2d: torch.Tensor, granularity: Granularity, group_size: int | None = None) -> torch.Tensor:
    """Rearrange ``x2d`` to ``[*positions, samples]`` so a reduction over the last axis gives one
    statistic per position."""
    rows, cols = x2d.shape
    if granularity is Granularity.TENSOR:
        return x2d.reshape(-1)
    if granularity is Granularity.ROW:
        return x2d
    if granularity is Granularity.COLUMN:
        return x2d.t()
    g = check_group_size(cols, group_size)
    return x2d.reshape(rows, cols // g, g)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bit_type: BitType, symmetric: bool, full_range: bool = False
) -> QParams:
    """Scale / zero point that map ``[lo, hi]`` onto ``bit_type``'s grid.

    Symmetric: ``scale = max(|lo|, |hi|) / qmax`` on a signed grid, zero point 0. With ``full_range``
    the divisor is ``qmax + 1/2`` (7.5 for int4): the step is as if all ``2**bits`` levels spanned
    ``[-absmax, absmax]``, so ``-absmax`` maps to ``qmin`` and ``+absmax`` clips to ``qmax``.
    Asymmetric: the range is widened to contain 0 (so 0 is exactly representable),
    ``scale = (hi - lo) / (qmax - qmin)`` on an unsigned grid, integer zero point.
    """
    lo = lo.float()
    hi = hi.float()
    if symmetric:
        if not bit_type.signed:
            raise ValueError("symmetric quantization needs a signed bit type")
        amax = torch.maximum(lo.abs(), hi.abs())
        half = 0.5 if full_range and not bit_type.is_float else 0.0  # FP8 has no integer step to split
        scale = (amax / (bit_type.qmax + half)).clamp_min(MIN_SCALE)
        zero = torch.zeros_like(scale)
    else:
        if bit_type.signed:
            raise ValueError("asymmetric quantization needs an unsigned bit type")
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        scale = ((hi - lo) / (bit_type.qmax - bit_type.qmin)).clamp_min(MIN_SCALE)
        zero = torch.round(bit_type.qmin - lo / scale).clamp(bit_type.qmin, bit_type.qmax)
    return QParams(scale, zero)


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bit_type: BitType) -> torch.Tensor:
    """Codes (as float) of ``x``: ``clamp(round(x / scale) + zero, qmin, qmax)``. On the e4m3 grid the rounding
    is to the nearest FP8 number (ties to even), after clamping to +-448."""
    if bit_type.is_float:
        return torch.clamp(x / scale + zero, bit_type.qmin, bit_type.qmax).to(torch.float8_e4m3fn).float()
    return torch.clamp(torch.round(x / scale) + zero, bit_type.qmin, bit_type.qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bit_type: BitType) -> torch.Tensor:
    """Quantize -> clamp -> dequantize. ``scale``/``zero`` must broadcast against ``x``.

    The arithmetic runs in float32 (half precision cannot hold ``x / scale`` exactly enough
    to round onto the right integer); the result has ``x``'s dtype.
    """
    xf = x.float()
    q = quantize_to_int(xf, scale, zero, bit_type)
    return ((q - zero) * scale).to(x.dtype)


def broadcast_qparams(
    x2d: torch.Tensor,
    qp: QParams,
    granularity: Granularity,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_view, scale, zero)`` shaped so that ``fake_quantize(x_view, scale, zero)``
    applies each position's parameters; reshape the result back with ``.reshape(x2d.shape)``.

    ``qp`` may also carry per-row parameters already selected for each row (shape ``[rows, 1]``
    for TENSOR, ``[rows, cols]`` for COLUMN) -- that is how row groups are applied.
    """
    rows, cols = x2d.shape
    scale, zero = qp.scale, qp.zero_point
    if granularity is Granularity.TENSOR:
        if scale.dim() == 0:
            return x2d, scale, zero
        return x2d, scale.reshape(rows, 1), zero.reshape(rows, 1)
    if granularity is Granularity.ROW:
        return x2d, scale.reshape(rows, 1), zero.reshape(rows, 1)
    if granularity is Granularity.COLUMN:
        if scale.dim() == 1:
            return x2d, scale.reshape(1, cols), zero.reshape(1, cols)
        return x2d, scale.reshape(rows, cols), zero.reshape(rows, cols)
    g = check_group_size(cols, group_size)
    return (
        x2d.reshape(rows, cols // g, g),
        scale.reshape(rows, cols // g, 1),
        zero.reshape(rows, cols // g, 1),
    )
