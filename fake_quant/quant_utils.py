"""Activation and weight quantizers, and the QuantLinear wrapper used everywhere.

``QuantLinear`` runs  [online rotation] -> input quantizer -> linear(quantized weight) -> [output
quantizer]; every part has an on/off switch, and with everything off it is exactly ``nn.Linear``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bit_type import get_bit_type
from .observer import mse_search
from .qparams import Granularity, QParams, broadcast_qparams, fake_quantize, qparams_from_range, sample_view
from .quantizer import UniformQuantizer


class RowGroupContext:
    """Holds the row-group index of the current forward pass.

    One context is shared by all activation quantizers of a model; whoever knows which rows belong
    to which group (e.g. the visual-token positions of a batch) sets it once per forward, and each
    quantizer reads it instead of recomputing it. ``index`` has one integer per row of the
    quantizers' 2-D input view (batch * sequence rows).
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None

    def set(self, index: torch.Tensor | None) -> None:
        self.index = None if index is None else index.reshape(-1)

    def clear(self) -> None:
        self.index = None


class ActQuantizer(UniformQuantizer):
    """Activation quantizer: dynamic per-token by default; static per-tensor/channel with
    ``static=True``; reads its row groups from a shared :class:`RowGroupContext` if given one."""

    def __init__(self, *args, context: RowGroupContext | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.context = context

    def forward(self, x: torch.Tensor, row_groups: torch.Tensor | None = None) -> torch.Tensor:
        if row_groups is None and self.context is not None and self.num_row_groups > 1:
            row_groups = self.context.index
        return super().forward(x, row_groups)


@dataclass
class WeightQuantizer:
    """Round-to-nearest weight quantization per output channel (``group_size=None``) or per group
    of input channels, symmetric or asymmetric, with an optional MSE clip search over shrink
    ratios (grid 100, max shrink 0.8, norm 2.4 by default, as GPTQ's reference code)."""

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None
    mse: bool = False
    grid: int = 100
    maxshrink: float = 0.8
    norm: float = 2.4
    full_range: bool = True   # symmetric scale absmax / (qmax + 1/2): see qparams_from_range
    enabled: bool = True

    def __post_init__(self) -> None:
        self.bit_type = get_bit_type(self.bits, self.symmetric)
        if self.group_size is not None and self.group_size <= 0:
            self.group_size = None

    @property
    def granularity(self) -> Granularity:
        return Granularity.GROUP if self.group_size else Granularity.ROW

    @torch.no_grad()
    def find_params(self, w: torch.Tensor, per_row: bool = False) -> QParams:
        """Parameters for ``w`` ``[out, in]``: shape ``[out]`` per channel (or when ``per_row``),
        ``[out, in // group_size]`` per group."""
        gran = Granularity.ROW if per_row else self.granularity
        view = sample_view(w.float(), gran, self.group_size)
        if self.mse:
            return mse_search(view, self.bit_type, self.symmetric, self.grid, self.maxshrink, self.norm,
                              self.full_range)
        return qparams_from_range(view.amin(dim=-1), view.amax(dim=-1), self.bit_type, self.symmetric,
                                  self.full_range)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor, qp: QParams | None = None, per_row: bool = False) -> torch.Tensor:
        """Fake-quantized copy of ``w`` (parameters found from ``w`` unless given)."""
        gran = Granularity.ROW if per_row else self.granularity
        qp = self.find_params(w, per_row=per_row) if qp is None else qp
        view, scale, zero = broadcast_qparams(w, qp, gran, self.group_size)
        return fake_quantize(view, scale, zero, self.bit_type).reshape(w.shape)


class QuantLinear(nn.Module):
    """Drop-in for ``nn.Linear``: [online rotation] -> input quantizer -> linear -> [output quantizer].

    It shares the wrapped layer's weight and bias (no copy). Weight quantization is applied in
    place, once, by :meth:`quantize_weight_` (RTN) or :meth:`set_quantized_weight_` (GPTQ);
    before that, an enabled ``weight_quantizer`` quantizes on the fly. Once the stored weight is
    quantized, the FP weight is gone: turning ``weight_quantizer`` off afterwards does not restore it.
    """

    def __init__(
        self,
        linear: nn.Linear,
        online_rotation: nn.Module | None = None,
        input_quantizer: ActQuantizer | None = None,
        weight_quantizer: WeightQuantizer | None = None,
        output_quantizer: ActQuantizer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear wraps nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.online_rotation = online_rotation
        self.use_online_rotation = online_rotation is not None
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        self.weight_quantizer = weight_quantizer
        self.weight_quantized = False
        self.capture = None  # callable(x) fed with the linear's actual input (after the online rotation)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)

    @torch.no_grad()
    def quantize_weight_(self) -> QParams:
        """Round-to-nearest the stored weight in place with ``weight_quantizer``."""
        if self.weight_quantizer is None:
            raise RuntimeError("this QuantLinear has no weight_quantizer")
        qp = self.weight_quantizer.find_params(self.weight)
        self.set_quantized_weight_(self.weight_quantizer.quantize(self.weight, qp), qp)
        return qp

    @torch.no_grad()
    def set_quantized_weight_(self, weight: torch.Tensor, qp: QParams | None = None) -> None:
        """Store an already fake-quantized weight (e.g. GPTQ's result)."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}")
        self.weight.data.copy_(weight.to(self.weight.dtype))
        self.weight_quantized = True
        if qp is not None:
            self.weight_scale = qp.scale.detach().float().cpu()
            self.weight_zero_point = qp.zero_point.detach().float().cpu()

    def effective_weight(self) -> torch.Tensor:
        q = self.weight_quantizer
        if q is not None and q.enabled and not self.weight_quantized:
            return q.quantize(self.weight)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_rotation is not None and self.use_online_rotation:
            x = self.online_rotation(x)
        if self.capture is not None:
            self.capture(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = F.linear(x, self.effective_weight(), self.bias)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.weight_quantizer is not None:
            wq = self.weight_quantizer
            s += f", w={wq.bit_type}" + (f"/g{wq.group_size}" if wq.group_size else "")
            s += ", quantized" if self.weight_quantized else ""
        return s


def find_linears(module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules by qualified name, minus those whose name contains a ``skip`` entry."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(s and s in name for s in skip)
    }


class PatchConvLinear(nn.Module):
    """A convolution whose kernel equals its stride (no padding, dilation or groups) -- a patch
    embedding -- is one linear map applied to every flattened patch. This module computes it that
    way, through a :class:`QuantLinear`, so the patch embedding is quantized like any linear layer."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        if not self.convertible(conv):
            raise ValueError(f"{type(conv).__name__} is not a patch convolution (kernel == stride, no padding)")
        self.kernel = tuple(conv.kernel_size)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        lin = nn.Linear(conv.weight[0].numel(), conv.out_channels, bias=conv.bias is not None,
                        dtype=conv.weight.dtype, device=conv.weight.device)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        self.linear = QuantLinear(lin)

    @staticmethod
    def convertible(conv: nn.Module) -> bool:
        return (isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and tuple(conv.kernel_size) == tuple(conv.stride)
                and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation) and conv.groups == 1
                and not isinstance(conv.padding, str))

    @property
    def weight(self) -> torch.Tensor:  # callers read the conv's weight dtype / device
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *size = x.shape
        k = len(self.kernel)
        if c != self.in_channels or len(size) != k or any(s % p for s, p in zip(size, self.kernel)):
            raise ValueError(f"patch convolution expects [N, {self.in_channels}, *sizes divisible by {self.kernel}], "
                             f"got {tuple(x.shape)}")
        grid = [s // p for s, p in zip(size, self.kernel)]
        # [N, C, g1, p1, g2, p2, ...] -> [N, g1, g2, ..., C, p1, p2, ...]
        x = x.reshape(n, c, *[v for g, p in zip(grid, self.kernel) for v in (g, p)])
        order = [0] + [2 + 2 * i for i in range(k)] + [1] + [3 + 2 * i for i in range(k)]
        patches = x.permute(*order).reshape(-1, c * math.prod(self.kernel))
        y = self.linear(patches).reshape(n, *grid, self.out_channels)
        return y.permute(0, k + 1, *range(1, k + 1))
