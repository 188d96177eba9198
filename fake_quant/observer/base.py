"""Observers collect statistics of the tensors a quantizer sees and turn them into QParams.

An observer can keep several independent sets of statistics, one per *row group*: pass
``row_groups`` (an integer per row of the 2-D view) to :meth:`Observer.update` and each row
updates only its own group. The observer does not know what a group means; modality-specific
quantization uses it with one group per modality.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..bit_type import BitType
from ..qparams import Granularity, QParams, as_matrix, qparams_from_range, sample_view


class Observer:
    """Base class. Subclasses implement ``_update_group`` and ``_range`` (or ``_qparams``)."""

    name: ClassVar[str] = ""

    def __init__(
        self,
        bit_type: BitType,
        symmetric: bool,
        granularity: Granularity | str = Granularity.TENSOR,
        group_size: int | None = None,
        num_row_groups: int = 1,
        clip_ratio: float = 1.0,
    ) -> None:
        self.bit_type = bit_type
        self.symmetric = symmetric
        self.granularity = Granularity.parse(granularity)
        self.group_size = group_size
        if num_row_groups < 1:
            raise ValueError(f"num_row_groups must be >= 1, got {num_row_groups}")
        if num_row_groups > 1 and self.granularity in (Granularity.ROW, Granularity.GROUP):
            raise ValueError(
                f"row groups need TENSOR or COLUMN granularity: {self.granularity.value} "
                "statistics are already per row"
            )
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
        self.num_row_groups = num_row_groups
        self.clip_ratio = clip_ratio
        self.reset()

    # -- public API -------------------------------------------------------------------------
    def reset(self) -> None:
        self.rows_seen = [0] * self.num_row_groups

    @torch.no_grad()
    def update(self, x: torch.Tensor, row_groups: torch.Tensor | None = None) -> None:
        x2d = as_matrix(x.detach()).float()
        if row_groups is None:
            if self.num_row_groups != 1:
                raise ValueError(
                    f"this observer keeps {self.num_row_groups} row groups: pass row_groups "
                    "(one group index per row) to update()"
                )
            self._update_group(0, sample_view(x2d, self.granularity, self.group_size))
            self.rows_seen[0] += x2d.shape[0]
            return
        idx = check_row_groups(row_groups, x2d.shape[0], self.num_row_groups).to(x2d.device)
        for g in range(self.num_row_groups):
            mask = idx == g
            n = int(mask.sum())
            if n == 0:
                continue
            self._update_group(g, sample_view(x2d[mask], self.granularity, self.group_size))
            self.rows_seen[g] += n

    @torch.no_grad()
    def compute(self) -> QParams:
        """QParams with a leading row-group axis: ``scale.shape == (num_row_groups, *positions)``."""
        empty = [g for g, n in enumerate(self.rows_seen) if n == 0]
        if empty:
            raise RuntimeError(
                f"{type(self).__name__}: row group(s) {empty} received no data during calibration; "
                "calibrate with inputs that contain rows of every group"
            )
        per_group = [self._qparams(g) for g in range(self.num_row_groups)]
        return QParams(
            torch.stack([p.scale for p in per_group]),
            torch.stack([p.zero_point for p in per_group]),
        )

    # -- hooks --------------------------------------------------------------------------------
    def _update_group(self, g: int, view: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _qparams(self, g: int) -> QParams:
        lo, hi = self._range(g)
        return qparams_from_range(lo * self.clip_ratio, hi * self.clip_ratio, self.bit_type, self.symmetric)


def check_row_groups(row_groups: torch.Tensor, rows: int, num_groups: int) -> torch.Tensor:
    """Validate a row-group index (one integer per row) and return it flattened."""
    idx = row_groups.reshape(-1)
    if idx.numel() != rows:
        raise ValueError(f"row_groups has {idx.numel()} entries but the input has {rows} rows")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"row_groups must be an integer tensor, got {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_groups):
        raise ValueError(
            f"row_groups values must lie in [0, {num_groups}), got [{int(idx.min())}, {int(idx.max())}]"
        )
    return idx.long()


_REGISTRY: dict[str, type[Observer]] = {}


def register_observer(cls: type[Observer]) -> type[Observer]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def build_observer(name: str, **kwargs) -> Observer:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; available: {sorted(_REGISTRY)}") from None
    return cls(**kwargs)


def available_observers() -> list[str]:
    return sorted(_REGISTRY)
