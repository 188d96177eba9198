"""GEMM kernels with a scale epilogue, for GPUs: ``torch._int_mm`` (int8) and ``torch._scaled_mm`` (FP8 e4m3).

Both run wherever torch has them -- on CUDA through cuBLASLt / CUTLASS, on the CPU through oneDNN or a
reference loop -- so the tests check their arithmetic on a CPU and a GPU only changes the speed. They share
the interface of :class:`fake_quant.int8_kernels.Int8Linear` and add one call the CPU kernels lack:

* ``static(x, scale, zero)``: one static per-tensor scale (zero point for the int8 kernel);
* ``static_rows(x, row_scale, row_zero)``: a precomputed scale per row -- MSQ's modality scales and the sink
  set, looked up by the row-group index, in any row order: the kernel's row-scale epilogue applies them, so
  neither AIFS's contiguous slices nor a gather is needed;
* ``dynamic(x, clip)``: per-token scales from the rows' absolute maxima, computed now (the baseline).

``int_mm``: int8 codes ``[M, K] x [K, N] -> int32``, then ``acc * (x_scale * w_scale) + bias`` in float32.
Asymmetric activations (uint8 codes with a zero point) are shifted onto int8 and the zero point's share,
``zero * sum_k w[n, k]``, is subtracted from the accumulator -- exact in integers.

``fp8``: e4m3 activation codes times the weight codes held in e4m3. An integer weight code is exact in e4m3
only up to 16 in magnitude, so this kernel serves weights of at most 5 bits (the paper's W4); 8-bit integer
weights run on ``int_mm``. The activations must have been calibrated on the e4m3 grid (``--a_format e4m3``):
int8 activation codes are not e4m3 numbers. With a bf16 output the scales go into the kernel (rowwise:
``scale_a [M, 1]``, ``scale_b [1, N]``); otherwise the kernel runs at scale 1 into float32 and the scales are
applied after it (torch's CUTLASS rowwise FP8 path writes bf16 only).

On CUDA the kernels' shape rules are met by zero padding (``_scaled_mm``: K and N multiples of 16;
``_int_mm``: M above 16, K and N multiples of 8). The weights are padded once; an input is padded only when
its width is not a multiple already (never at the widths of the paper's models).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bit_type import E4M3_MAX
from .int8_kernels import SIGNED_ZERO, Int8Linear, quantizer, quantizer_registry, row_scales

FP8 = torch.float8_e4m3fn
FP8_WEIGHT_CODE_MAX = 16  # integers of magnitude <= 16 are exact e4m3 numbers (17 is not)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------
# activation quantizers (eager, or compiled into one loop: see int8_kernels.quantizer)
# ---------------------------------------------------------------------------------------------
def quantize_s8(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """uint8-grid codes ``clamp(round(x / scale) + zero, 0, 255)`` shifted by -128 onto int8 (``scale`` and
    ``zero`` may be 0-d or one per row)."""
    q = (x.float() / scale).round_().add_(zero).clamp_(0, 255).sub_(SIGNED_ZERO)
    return q.to(torch.int8)


def quantize_rows_s8(x: torch.Tensor, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8 codes and their row scales ``[rows, 1]``."""
    xf = x.float()
    scale = row_scales(xf, clip, 127)
    return (xf / scale).round_().clamp_(-128, 127).to(torch.int8), scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of ``x / scale`` (clamped to +-448 first: e4m3 has no infinity)."""
    return (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8)


def quantize_rows_fp8(x: torch.Tensor, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token e4m3 codes and their row scales ``[rows, 1]`` (``amax * clip / 448``)."""
    xf = x.float()
    scale = row_scales(xf, clip, E4M3_MAX)
    return (xf / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8), scale


# compiled with the quantizers (and int8_kernels.epilogue) under --real_quant_fuse
quantizer_registry.update({"s8": quantize_s8, "rows_s8": quantize_rows_s8, "fp8": quantize_fp8,
                           "rows_fp8": quantize_rows_fp8})


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def _per_row(v: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    """A 0-d scale / zero point as it is; a per-row vector as ``[rows, 1]`` float32, padded with ``fill`` for
    the zero rows a kernel's shape rule added."""
    if v.dim() == 0:
        return v.float()
    v = v.reshape(-1, 1).float()
    if v.shape[0] > rows:
        raise ValueError(f"{v.shape[0]} row scales for {rows} rows")
    return F.pad(v, (0, 0, 0, rows - v.shape[0]), value=fill) if v.shape[0] < rows else v


class EpilogueLinear(Int8Linear):
    """Weights padded to the kernel's multiples and kept on the model's device; subclasses quantize and call."""

    k_multiple = 1
    n_multiple = 1
    min_rows = 0   # the kernel needs more rows than this (padded with zero rows)

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, fuse: bool,
                 device: torch.device | str = "cpu", shape_rules: bool | None = None, asymmetric: bool = False) -> None:
        super().__init__(codes, w_scale, bias, fuse)
        self.asymmetric = asymmetric  # activations on an unsigned grid with a zero point (int_mm only)
        device = torch.device(device)
        self.device = device
        self.shape_rules = device.type == "cuda" if shape_rules is None else shape_rules
        km, nm = (self.k_multiple, self.n_multiple) if self.shape_rules else (1, 1)
        # a single input column (an RMS branch) is padded to two: torch 2.13's CPU _int_mm reads past a
        # [1, N] weight (its strides are ambiguous) and returns garbage
        self.k_pad = max(_round_up(self.in_features, km), 2) - self.in_features
        self.n_pad = _round_up(self.out_features, nm) - self.out_features
        self.w_scale = self.w_scale.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        self.w_scale_n = self.w_scale.reshape(1, -1)  # the real outputs' scales, for epilogues after the kernel
        self.w_scale_row = F.pad(self.w_scale, (0, self.n_pad), value=1.0).reshape(1, -1).contiguous()
        self._pick_quantizers()

    def _pad_weight(self, codes: torch.Tensor) -> torch.Tensor:
        return F.pad(codes, (0, self.k_pad, 0, self.n_pad)) if (self.k_pad or self.n_pad) else codes

    def _pad_input(self, xf: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Pad the float input's columns to the kernel's multiple and its rows above ``min_rows``."""
        if xf.stride(-1) != 1:  # cuBLASLt multiplies a row-major activation by the column-major weight only
            xf = xf.contiguous()
        rows = xf.shape[0]
        extra_rows = (_round_up(self.min_rows + 1, 8) - rows) if self.shape_rules and rows <= self.min_rows else 0
        if self.k_pad or extra_rows:
            xf = F.pad(xf, (0, self.k_pad, 0, extra_rows))
        return xf, rows

    def _unpad(self, y: torch.Tensor, rows: int) -> torch.Tensor:
        """The kernel's output without the rows and columns its shape rules added (a view)."""
        return y[:rows, :self.out_features] if (self.n_pad or y.shape[0] != rows) else y

    @staticmethod
    def _rows(v: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        return v[:rows] if v is not None and v.dim() and v.shape[0] != rows else v

    def static(self, x, scale, zero, out_dtype):  # the quantize step is inside static_rows (padding first)
        return self.static_rows(x, scale, zero, out_dtype)

    def _pick_quantizers(self) -> None:
        self._epilogue = quantizer("epilogue", self.fuse)

    def static_rows(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class IntMMLinear(EpilogueLinear):
    """``torch._int_mm``: int8 x int8 -> int32, scales and the zero-point correction applied after."""

    name = "int_mm"
    k_multiple = n_multiple = 8
    min_rows = 16

    def __init__(self, codes, w_scale, bias, fuse, device="cpu", shape_rules=None, asymmetric=False) -> None:
        super().__init__(codes, w_scale, bias, fuse, device, shape_rules, asymmetric)
        w = self._pad_weight(codes.to(self.device))
        self.w_t = w.t()  # [K, N] column-major: the layout cuBLASLt's int8 GEMM wants
        # the zero point's share of each output: sum over k of the weight codes (int32 is exact)
        self.w_sum = w[:self.out_features].sum(dim=1, dtype=torch.int32).float().reshape(1, -1)

    def _pick_quantizers(self) -> None:
        self._q = quantizer("s8", self.fuse)
        self._q_rows = quantizer("rows_s8", self.fuse)
        super()._pick_quantizers()  # the epilogue

    def static_rows(self, x, scale, zero, out_dtype):
        xf, rows = self._pad_input(x)
        scale, zero = _per_row(scale, xf.shape[0], 1.0), _per_row(zero, xf.shape[0], SIGNED_ZERO)
        acc = self._unpad(torch._int_mm(self._q(xf, scale, zero), self.w_t), rows)
        # symmetric grids: the codes' zero point on int8 is 0 (known here, so no check of the value at run time)
        shift = self._rows(zero - SIGNED_ZERO, rows) if self.asymmetric else None
        return self._epilogue(acc, self._rows(scale, rows), self.w_scale_n, self.bias, out_dtype, shift, self.w_sum)

    def dynamic(self, x, clip, out_dtype):
        xf, rows = self._pad_input(x)
        q, row_scale = self._q_rows(xf, clip)
        acc = self._unpad(torch._int_mm(q, self.w_t), rows)
        return self._epilogue(acc, row_scale[:rows], self.w_scale_n, self.bias, out_dtype)


class Fp8Linear(EpilogueLinear):
    """``torch._scaled_mm`` on e4m3: activations on the e4m3 grid, integer weight codes (|code| <= 16) in e4m3."""

    name = "fp8"
    k_multiple = n_multiple = 16

    def __init__(self, codes, w_scale, bias, fuse, device="cpu", shape_rules=None, asymmetric=False) -> None:
        if asymmetric:
            raise ValueError("the e4m3 grid is symmetric: the fp8 kernel takes no activation zero point")
        if codes.numel() and int(codes.short().abs().max()) > FP8_WEIGHT_CODE_MAX:
            raise ValueError(f"weight codes up to {int(codes.short().abs().max())} are not exact in e4m3 (only "
                             f"integers up to {FP8_WEIGHT_CODE_MAX}): the fp8 kernel serves weights of at most 5 "
                             "bits; run 8-bit weights on the int_mm backend")
        super().__init__(codes, w_scale, bias, fuse, device, shape_rules, asymmetric)
        w = self._pad_weight(codes.to(self.device)).to(FP8)
        self.w_t = w.t()  # [K, N] column-major, as _scaled_mm requires
        self.one = torch.ones((), device=self.device)

    def _pick_quantizers(self) -> None:
        self._q = quantizer("fp8", self.fuse)
        self._q_rows = quantizer("rows_fp8", self.fuse)
        super()._pick_quantizers()  # the epilogue

    def _mm(self, q: torch.Tensor, row_scale: torch.Tensor, rows: int, out_dtype: torch.dtype) -> torch.Tensor:
        """``q @ w * row_scale * w_scale + bias`` (``row_scale`` 0-d or ``[rows, 1]``)."""
        if out_dtype == torch.bfloat16:  # rowwise scales inside the kernel (bf16: the output every rowwise path takes)
            scale_a = row_scale.reshape(-1, 1).expand(q.shape[0], 1).contiguous()
            y = self._unpad(torch._scaled_mm(q, self.w_t, scale_a=scale_a, scale_b=self.w_scale_row,
                                             out_dtype=out_dtype), rows)
            return y if self.bias is None else self._epilogue(y, None, None, self.bias, out_dtype)
        if row_scale.dim() == 0:  # tensorwise: the activation scale in the kernel, the channel scales after
            y = torch._scaled_mm(q, self.w_t, scale_a=row_scale, scale_b=self.one, out_dtype=torch.float32)
            return self._epilogue(self._unpad(y, rows), None, self.w_scale_n, self.bias, out_dtype)
        y = torch._scaled_mm(q, self.w_t, scale_a=self.one, scale_b=self.one, out_dtype=torch.float32)
        return self._epilogue(self._unpad(y, rows), row_scale[:rows], self.w_scale_n, self.bias, out_dtype)

    def static_rows(self, x, scale, zero, out_dtype):
        xf, rows = self._pad_input(x)
        scale = _per_row(scale, xf.shape[0], 1.0)
        return self._mm(self._q(xf, scale), scale, rows, out_dtype)

    def dynamic(self, x, clip, out_dtype):
        xf, rows = self._pad_input(x)
        q, row_scale = self._q_rows(xf, clip)
        return self._mm(q, row_scale, rows, out_dtype)


def fp8_supported(device: torch.device) -> str | None:
    """Why ``torch._scaled_mm`` on e4m3 cannot run on ``device``, or None."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no float8_e4m3fn / torch._scaled_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"FP8 tensor cores need compute capability 8.9 or newer (Ada, Hopper); "
                    f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --real_quant_backend int_mm")
    return None


SCALED_MM_KERNELS = {"int_mm": IntMMLinear, "fp8": Fp8Linear}
