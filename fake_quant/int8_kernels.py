"""Int8 GEMM kernels behind one small interface, and the activation quantizers that feed them.

Every kernel multiplies uint8 activation codes by int8 weight codes (per-output-channel scales) and
returns floating point. An activation grid is ``(scale, zero)`` on uint8: ``clamp(round(x / scale) +
zero, 0, 255)``; a symmetric int8 grid is the same with ``zero = 128`` (the codes shifted by 128), so
both signed and unsigned calibrated grids run on the same u8 x s8 kernels.

* ``onednn``: ``torch.ops.onednn.qlinear_prepack`` / ``qlinear_pointwise`` -- one static per-tensor scale
  per call, fp32 or bf16 out. Fed u8 (not s8): on a CPU with VNNI but no AMX oneDNN 3.12 has no fast
  s8 x s8 matmul and runs its reference loop (``ref_int8``; 13 s for 256x1536x1536 on the development
  machine), while u8 x s8 runs ``brg_matmul:avx512_core_vnni``.
* ``fbgemm``: ``torch.ops.quantized.linear_prepack`` + ``linear_with_input_q_dq_qweight_dq_output_fp32``
  -- fp32 in, the static quantization done inside the kernel (or integer codes at scale 1), fp32 out. Without VNNI its u8 x s8 pair
  products are summed in int16 and can saturate for 8-bit weights; ``reduce_range`` then puts the
  activations on a 7-bit grid (see :class:`FbgemmInt8Linear`).

Dynamic per-token quantization runs through the same kernels: the row scales are computed at run time,
the kernel is called with scale 1 and the rows are rescaled afterwards (the bias is added after that).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable

import torch

from .qparams import MIN_SCALE

U8_MAX = 255
SIGNED_ZERO = 128  # a symmetric int8 grid on uint8


class KernelUnavailable(RuntimeError):
    """The torch build lacks an op a kernel needs (the message names it)."""


def _op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>``, or :class:`KernelUnavailable` naming it."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        raise KernelUnavailable(
            f"torch.ops.{namespace}.{name} is missing from this torch build ({torch.__version__}); real int8 "
            "execution needs a torch CPU build with oneDNN (USE_MKLDNN) or fbgemm (USE_FBGEMM), e.g. the official "
            "x86-64 wheels") from None


def require_ops(backend: str) -> None:
    """Fail early, naming the missing op, when this torch cannot run ``backend``."""
    needed = {"onednn": [("onednn", "qlinear_prepack"), ("onednn", "qlinear_pointwise")],
              "fbgemm": [("quantized", "linear_prepack"),
                         ("quantized", "linear_with_input_q_dq_qweight_dq_output_fp32")]}[backend]
    for ns, name in needed:
        _op(ns, name)
    if backend == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise KernelUnavailable("the fbgemm quantized engine is not in this torch build "
                                f"(torch.backends.quantized.supported_engines = "
                                f"{torch.backends.quantized.supported_engines}); use the onednn backend")


# ---------------------------------------------------------------------------------------------
# activation quantizers (eager: one op per step; compiled: one fused loop)
# ---------------------------------------------------------------------------------------------
def quantize_u8(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / scale) + zero, 0, 255)`` as uint8, computed in float32 like the fake quantizer."""
    q = x.float() / scale
    q = q.round_().add_(zero).clamp_(0, U8_MAX)
    return q.to(torch.uint8)


def row_scales(xf: torch.Tensor, clip: torch.Tensor, qmax: float) -> torch.Tensor:
    """Dynamic symmetric per-token scales ``[rows, 1]``: each row's absolute maximum times ``clip``, over ``qmax``
    (the fake quantizer's min-max rule, to the last bit)."""
    return (xf.abs().amax(dim=-1, keepdim=True) * clip / qmax).clamp_min(MIN_SCALE)


def quantize_rows_u8(x: torch.Tensor, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token: each row's scale from its absolute maximum (times ``clip``), then
    the codes shifted onto uint8. Returns ``(codes, scales [rows, 1])``."""
    xf = x.float()
    scale = row_scales(xf, clip, 127)
    q = (xf / scale).round_().add_(SIGNED_ZERO).clamp_(0, U8_MAX)
    return q.to(torch.uint8), scale


def quantize_rows_float(x: torch.Tensor, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`quantize_rows_u8`, but the signed codes stay float32 (fbgemm quantizes its input itself,
    and does it exactly for integer values at scale 1)."""
    xf = x.float()
    scale = row_scales(xf, clip, 127)
    return (xf / scale).round_().clamp_(-128, 127), scale


def quantize_float_grid(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Codes ``clamp(round(x / scale), qmin, qmax)`` as float32: fbgemm's input at scale 1 (the zero point is
    added by the kernel)."""
    return (x.float() / scale).round_().clamp_(qmin, qmax)


def epilogue(y: torch.Tensor, row_scale: torch.Tensor | None, w_scale: torch.Tensor | None,
             bias: torch.Tensor | None, out_dtype: torch.dtype, shift: torch.Tensor | None = None,
             w_sum: torch.Tensor | None = None) -> torch.Tensor:
    """What a kernel left to do after it, in float32, then one rounding to ``out_dtype``: the activation zero
    point's share ``shift * w_sum`` taken out (int_mm with an asymmetric grid), the row scales (0-d or
    ``[rows, 1]``: per-token rows, fbgemm at scale 1) and the channel scales ``[1, N]`` (None: applied inside the
    kernel), the bias."""
    y = y.float()
    if shift is not None:
        y = y - shift * w_sum
    if row_scale is not None and w_scale is not None:
        y = y * (row_scale * w_scale)
    elif row_scale is not None or w_scale is not None:
        y = y * (row_scale if row_scale is not None else w_scale)
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


_COMPILED: dict[str, Callable] = {}
RECOMPILE_LIMIT = 64
# every activation quantizer a kernel may ask for by name (fake_quant.scaled_mm adds its own), and the epilogue
# of the kernels that leave scales to apply after them: the same one-loop treatment under fuse
quantizer_registry: dict[str, Callable] = {"u8": quantize_u8, "rows_u8": quantize_rows_u8,
                                           "rows_float": quantize_rows_float, "float_grid": quantize_float_grid,
                                           "epilogue": epilogue}


def quantizer(name: str, fuse: bool) -> Callable:
    """The eager function, or its ``torch.compile`` version (one fused loop over the input; compiled once,
    with dynamic shapes, and shared by every layer since scales are passed as tensors)."""
    fn = quantizer_registry[name]
    if not fuse:
        return fn
    if name not in _COMPILED:
        # one function serves every layer and call: float32 and bf16 inputs, a scalar scale or one per row, runs of
        # one row (specialized by the compiler) -- more variants than Dynamo's default limit of 8 per function
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[name]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
class Int8Linear:
    """int8 weight codes ``[out, in]`` with per-output-channel scales and an optional fp32 bias."""

    name = "base"

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, fuse: bool) -> None:
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"weight codes must be a 2-D int8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        self.out_features, self.in_features = codes.shape
        self.w_scale = w_scale.detach().float().reshape(-1).contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.fuse = fuse

    # each path in two halves (quantize, then multiply), so that the quantization can run inside the op that
    # produces the input (the online Hadamard transform, block by block of whole rows): see RealQuantLinear
    fuses_input = False

    def static(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``x [rows, in]`` on the uint8 grid ``(scale, zero)`` (0-d float32 tensors), times the weight, plus bias."""
        return self.multiply_static(self.quantize_static(x, scale, zero), scale, zero, out_dtype)

    def quantize_static(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The codes this kernel multiplies, for rows ``x`` (any subset of rows: it is row by row)."""
        raise NotImplementedError

    def multiply_static(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def dynamic(self, x: torch.Tensor, clip: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """``x [rows, in]`` quantized per row (symmetric, scales from the rows now), times the weight, plus bias."""
        codes, row_scale = self.quantize_dynamic(x, clip)
        return self.multiply_dynamic(codes, row_scale, out_dtype)

    def quantize_dynamic(self, x: torch.Tensor, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token codes and their row scales ``[rows, 1]`` (row by row, so any block of rows on its own)."""
        raise NotImplementedError

    def multiply_dynamic(self, codes: torch.Tensor, row_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def set_fuse(self, fuse: bool) -> None:
        """Switch the activation quantization between eager passes and one compiled loop."""
        self.fuse = fuse
        self._pick_quantizers()

    def _pick_quantizers(self) -> None:
        pass

    def _rescale(self, y: torch.Tensor, row_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.fuse or y.dtype != torch.float32:  # compiled: one loop (read, scale, bias, round once, write)
            return quantizer("epilogue", self.fuse)(y, row_scale, None, self.bias, out_dtype)
        y = y.mul_(row_scale)  # eager float32: in place
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(out_dtype)

    def nbytes(self) -> int:
        return self.out_features * self.in_features


class OneDNNInt8Linear(Int8Linear):
    """oneDNN's u8 x s8 linear (``qlinear_pointwise``): the static activation scale, the weight scales and the bias
    are applied inside the kernel, which writes the output dtype directly.

    Per-token dynamic rows: the kernel takes one activation scale only, so it runs at scale 1 and the rows are
    rescaled afterwards (:func:`epilogue`). By default its output is float32, so the result is rounded once, as
    in the static path. ``dynamic_gemm_out_dtype = True`` has the kernel write the output dtype already (bf16: half
    the bytes written and read again), at the price of a second rounding -- a faster, slightly less exact dynamic
    baseline that ``bench/ttft.py`` times as a row of its own."""

    name = "onednn"
    dynamic_gemm_out_dtype = False

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, fuse: bool) -> None:
        super().__init__(codes, w_scale, bias, fuse)
        require_ops("onednn")
        self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
        self.w_zero = torch.zeros(self.out_features, dtype=torch.long)
        self._pick_quantizers()

    def _pick_quantizers(self) -> None:
        self._q = quantizer("u8", self.fuse)
        self._q_rows = quantizer("rows_u8", self.fuse)

    def matmul(self, q: torch.Tensor, x_scale: float, x_zero: int, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(q, x_scale, x_zero, self.packed, self.w_scale, self.w_zero, bias,
                                                  1.0, 0, out_dtype, "none", [], "")

    fuses_input = True

    def quantize_static(self, x, scale, zero):
        return self._q(x, scale, zero)

    def multiply_static(self, codes, scale, zero, out_dtype):
        return self.matmul(codes, float(scale), int(zero), self.bias, out_dtype)

    def quantize_dynamic(self, x, clip):
        return self._q_rows(x, clip)

    def multiply_dynamic(self, codes, row_scale, out_dtype):
        y = self.matmul(codes, 1.0, SIGNED_ZERO, None, out_dtype if self.dynamic_gemm_out_dtype else torch.float32)
        return self._rescale(y, row_scale, out_dtype)


@contextmanager
def _engine(name: str):
    """Prepack with a given quantized engine (the packed weight then dispatches on its own type)."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


class FbgemmInt8Linear(Int8Linear):
    """fbgemm's static fp32-in / fp32-out int8 linear.

    ``kernel_quantize``: let the kernel quantize the fp32 input with the static scale itself (one pass and
    one output rescale fewer). It multiplies by the reciprocal scale in a fused multiply-add, so an input that
    lies exactly halfway between two codes can round to the other one than the fake quantizer's
    ``round(x / scale)`` (half to even) -- one code, at exact ties only. Off by default: the layer then feeds
    the kernel integer codes at scale 1 (which it quantizes exactly) and rescales the output.

    ``reduce_range``: fbgemm's u8 x s8 kernel on a CPU without VNNI sums pairs of products in int16
    (``vpmaddubsw``), which saturates when two large activation codes meet two large 8-bit weights. Then
    the activations are put on a 7-bit grid (``[-64, 63]`` at twice the scale; codes shifted by 64), which
    cannot saturate -- at the price of one activation bit, so such a layer no longer equals the fake-quant
    model exactly. 4-bit weights never saturate and never need it.
    """

    name = "fbgemm"

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, fuse: bool,
                 reduce_range: bool = False, dynamic: bool = False, kernel_quantize: bool = False) -> None:
        super().__init__(codes, w_scale, bias, fuse)
        require_ops("fbgemm")
        self.reduce_range = reduce_range
        self.kernel_quantize = kernel_quantize and not reduce_range
        with warnings.catch_warnings(), _engine("fbgemm"):
            # fbgemm's prepack takes a quantized tensor; the deprecation of those tensors is not ours to act on
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(codes.contiguous(), self.w_scale.double(),
                                                          torch.zeros(self.out_features, dtype=torch.long), 0)
            # dynamic rows and the reduced range rescale the kernel's output, so their bias is added after that
            self.bias_in_kernel = self.kernel_quantize and not dynamic
            self.packed = torch.ops.quantized.linear_prepack(qw, self.bias if self.bias_in_kernel else None)
        self._pick_quantizers()

    def _pick_quantizers(self) -> None:
        self._q_rows = quantizer("rows_float", self.fuse)
        self._q_grid = quantizer("float_grid", self.fuse)

    def _run(self, x: torch.Tensor, x_scale: float, x_zero: int, packed) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x.contiguous(), x_scale, x_zero,
                                                                                   packed)

    @property
    def fuses_input(self) -> bool:  # the kernel's own quantization takes the whole input: nothing to fuse
        return not self.kernel_quantize

    def static(self, x, scale, zero, out_dtype):
        if self.kernel_quantize:
            self._bias_kind(True)
            return self._run(x, float(scale), int(zero), self.packed).to(out_dtype)
        return super().static(x, scale, zero, out_dtype)

    def quantize_static(self, x, scale, zero):
        if self.reduce_range:
            if int(zero) != SIGNED_ZERO:
                raise ValueError("fbgemm's reduced range serves symmetric activations only (drop --a_asym)")
            return self._q_grid(x, scale * 2, -64, 63)
        z = int(zero)
        return self._q_grid(x, scale, -z, U8_MAX - z)  # rounded like the fake quantizer; exact at scale 1

    def multiply_static(self, codes, scale, zero, out_dtype):
        self._bias_kind(False)
        if self.reduce_range:
            return self._rescale(self._run(codes, 1.0, 64, self.packed), scale * 2, out_dtype)
        return self._rescale(self._run(codes, 1.0, int(zero), self.packed), scale, out_dtype)

    def quantize_dynamic(self, x, clip):
        return self._q_rows(x, clip)

    def multiply_dynamic(self, codes, row_scale, out_dtype):
        self._bias_kind(False)
        y = self._run(codes, 1.0, SIGNED_ZERO, self.packed)
        return self._rescale(y, row_scale, out_dtype)

    def _bias_kind(self, in_kernel: bool) -> None:
        if self.bias is not None and in_kernel != self.bias_in_kernel:
            raise RuntimeError("this fbgemm weight was packed for the other activation mode (static / dynamic)")


KERNELS = {"onednn": OneDNNInt8Linear, "fbgemm": FbgemmInt8Linear}
