"""The uniform fake quantizer: quantize -> clamp -> dequantize, for every granularity.

* dynamic: scales come from the tensor being quantized, at every call;
* static: scales come from calibration (an observer watches while ``calibrating`` is on),
  are frozen by :meth:`UniformQuantizer.freeze`, and are then used for every input.

A static quantizer may hold several scale sets (``num_row_groups``) and pick one per row from a
row-group index passed to ``forward`` (``default_row_group`` serves calls that pass none).
"""
from __future__ import annotations

import torch
from torch import nn

from ..bit_type import get_bit_type
from ..observer import build_observer, check_row_groups
from ..observer.base import Observer
from ..qparams import Granularity, QParams, as_matrix, broadcast_qparams, fake_quantize, qparams_from_range, sample_view

STATIC_GRANULARITIES = (Granularity.TENSOR, Granularity.COLUMN)


class UniformQuantizer(nn.Module):
    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        granularity: Granularity | str = Granularity.ROW,
        group_size: int | None = None,
        static: bool = False,
        observer: str = "minmax",
        observer_kwargs: dict | None = None,
        clip_ratio: float = 1.0,
        num_row_groups: int = 1,
        default_row_group: int | None = 0,
        fmt: str = "int",
    ) -> None:
        super().__init__()
        self.bit_type = get_bit_type(bits, symmetric, fmt)
        self.symmetric = symmetric
        self.granularity = Granularity.parse(granularity)
        self.group_size = group_size
        self.static = static
        self.observer_name = observer
        self.observer_kwargs = dict(observer_kwargs or {})
        self.clip_ratio = clip_ratio
        self.num_row_groups = num_row_groups
        self.default_row_group = default_row_group
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
        if self.granularity is Granularity.GROUP and not (group_size and group_size > 0):
            raise ValueError("GROUP granularity needs a positive group_size")
        if static and self.granularity not in STATIC_GRANULARITIES:
            raise ValueError(
                f"static scales must be per tensor or per channel, not {self.granularity.value}: "
                "per-token and per-group scales depend on the tokens and only exist dynamically"
            )
        if num_row_groups > 1 and not static:
            raise ValueError("several row groups need static scales (dynamic scales ignore them)")
        if default_row_group is not None and not 0 <= default_row_group < num_row_groups:
            raise ValueError(f"default_row_group {default_row_group} is outside [0, {num_row_groups})")
        self.enabled = True
        self.calibrating = False
        self.observer: Observer | None = None
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def bits(self) -> int:
        return self.bit_type.bits

    # -- calibration ----------------------------------------------------------------------------
    def new_observer(self, num_row_groups: int | None = None) -> Observer:
        return build_observer(
            self.observer_name,
            bit_type=self.bit_type,
            symmetric=self.symmetric,
            granularity=self.granularity,
            group_size=self.group_size,
            num_row_groups=self.num_row_groups if num_row_groups is None else num_row_groups,
            clip_ratio=self.clip_ratio,
            **self.observer_kwargs,
        )

    def start_calibration(self) -> None:
        if not self.static:
            raise RuntimeError("only static quantizers are calibrated")
        self.observer = self.new_observer()
        self.calibrating = True

    def freeze(self) -> QParams:
        """Turn the observed statistics into frozen scales and stop calibrating."""
        if self.observer is None:
            raise RuntimeError("freeze() called before start_calibration()")
        qp = self.observer.compute()
        self.set_qparams(qp)
        self.observer = None
        self.calibrating = False
        return qp

    def set_qparams(self, qp: QParams) -> None:
        """Install static scales shaped ``[num_row_groups, *positions]``."""
        if qp.scale.shape[0] != self.num_row_groups:
            raise ValueError(
                f"expected {self.num_row_groups} scale set(s), got a leading dimension of {qp.scale.shape[0]}"
            )
        self.scale = qp.scale.float()
        self.zero_point = qp.zero_point.float()

    @property
    def is_frozen(self) -> bool:
        return self.scale is not None

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, row_groups: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.static:
            if self.calibrating:
                self.observer.update(x, self._rows_for_observer(x, row_groups))
                return x
            return self._static(x, row_groups)
        return self._dynamic(x)

    def _rows_for_observer(self, x: torch.Tensor, row_groups: torch.Tensor | None) -> torch.Tensor | None:
        if self.num_row_groups == 1:
            return None
        if row_groups is None:
            if self.default_row_group is None:
                raise ValueError("this quantizer has several scale sets and no default: pass row_groups")
            rows = as_matrix(x).shape[0]
            return torch.full((rows,), self.default_row_group, dtype=torch.long, device=x.device)
        return row_groups

    def _static(self, x: torch.Tensor, row_groups: torch.Tensor | None) -> torch.Tensor:
        if not self.is_frozen:
            raise RuntimeError(
                "static quantizer used before calibration: call start_calibration(), run the "
                "calibration data, then freeze()"
            )
        x2d = as_matrix(x)
        scale, zero = self.scale.to(x.device), self.zero_point.to(x.device)
        if row_groups is None or self.num_row_groups == 1:
            g = 0 if self.num_row_groups == 1 else self.default_row_group
            if g is None:
                raise ValueError("this quantizer has several scale sets and no default: pass row_groups")
            qp = QParams(scale[g], zero[g])
        else:
            idx = check_row_groups(row_groups, x2d.shape[0], self.num_row_groups).to(x.device)
            qp = QParams(scale[idx], zero[idx])
        return self.quantize_with(x, qp)

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        x2d = as_matrix(x)
        if self.observer_name == "minmax":
            view = sample_view(x2d.float(), self.granularity, self.group_size)
            lo, hi = view.amin(dim=-1), view.amax(dim=-1)
            qp = qparams_from_range(lo * self.clip_ratio, hi * self.clip_ratio, self.bit_type, self.symmetric)
        else:
            obs = self.new_observer(num_row_groups=1)
            obs.update(x2d)
            full = obs.compute()
            qp = QParams(full.scale[0], full.zero_point[0])
        return self.quantize_with(x, qp)

    def quantize_with(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        """Fake-quantize ``x`` with explicit parameters shaped for this quantizer's granularity."""
        x2d = as_matrix(x)
        view, scale, zero = broadcast_qparams(x2d, qp, self.granularity, self.group_size)
        return fake_quantize(view, scale, zero, self.bit_type).reshape(x.shape)

    def extra_repr(self) -> str:
        mode = "static" if self.static else "dynamic"
        s = f"{self.bit_type}, {self.granularity.value}, {mode}, observer={self.observer_name}"
        if self.group_size:
            s += f", group_size={self.group_size}"
        if self.clip_ratio != 1.0:
            s += f", clip_ratio={self.clip_ratio}"
        if self.num_row_groups > 1:
            s += f", row_groups={self.num_row_groups}"
        return s + ("" if self.enabled else ", disabled")
