"""Observers that need the samples themselves (percentile, MSE search).

They keep a uniform random sample of at most ``max_samples`` values per row group: each sample
gets a random key and the smallest keys are kept, which is a uniform sample without replacement
of everything seen, however many batches arrive. Below the cap the statistics are exact.
"""
from __future__ import annotations

import torch

from ..qparams import QParams, fake_quantize, qparams_from_range
from .base import Observer, register_observer


class SamplePoolObserver(Observer):
    def __init__(self, *args, max_samples: int = 1 << 22, seed: int = 0, **kwargs) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = max_samples
        self.seed = seed
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._gen = torch.Generator().manual_seed(self.seed)
        self._pool: list[torch.Tensor | None] = [None] * self.num_row_groups
        self._keys: list[torch.Tensor | None] = [None] * self.num_row_groups

    def _update_group(self, g: int, view: torch.Tensor) -> None:
        keys = torch.rand(view.shape[-1], generator=self._gen).to(view.device)
        if self._pool[g] is not None:
            if view.shape[:-1] != self._pool[g].shape[:-1]:
                raise ValueError(
                    f"statistics shape changed between updates ({tuple(self._pool[g].shape[:-1])} -> "
                    f"{tuple(view.shape[:-1])}): per-row statistics need inputs with the same rows"
                )
            view = torch.cat([self._pool[g], view], dim=-1)
            keys = torch.cat([self._keys[g], keys])
        positions = max(1, view[..., 0].numel())
        cap = max(1, self.max_samples // positions)
        if keys.numel() > cap:
            keep = torch.topk(keys, cap, largest=False).indices
            view, keys = view.index_select(-1, keep), keys[keep]
        self._pool[g], self._keys[g] = view, keys

    def samples(self, g: int = 0) -> torch.Tensor:
        """The retained samples of group ``g`` as ``[*positions, samples]``."""
        return self._pool[g]


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(values, 100*q, axis=-1)`` with linear interpolation, without
    ``torch.quantile``'s input-size limit."""
    sorted_vals = values.sort(dim=-1).values
    n = sorted_vals.shape[-1]
    pos = q * (n - 1)
    lo_i = int(pos)
    hi_i = min(lo_i + 1, n - 1)
    frac = pos - lo_i
    return sorted_vals[..., lo_i] + (sorted_vals[..., hi_i] - sorted_vals[..., lo_i]) * frac


@register_observer
class PercentileObserver(SamplePoolObserver):
    """Range = [(100-p)th, p-th] percentile of the samples (``percentile`` = p, e.g. 99.99)."""

    name = "percentile"

    def __init__(self, *args, percentile: float = 99.99, **kwargs) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        super().__init__(*args, **kwargs)

    def _range(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self._pool[g]
        p = self.percentile / 100.0
        return linear_quantile(pool, 1.0 - p), linear_quantile(pool, p)


@register_observer
class MseObserver(SamplePoolObserver):
    """Shrinks the min/max range by ``1 - i/grid`` for ``i < maxshrink*grid`` and keeps, per
    position, the range whose fake-quantized samples have the least ``sum |err|^norm``.
    The unshrunk range is a candidate, so the result is never worse than plain min/max."""

    name = "mse"

    def __init__(self, *args, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4, **kwargs) -> None:
        if grid < 1 or not 0.0 <= maxshrink < 1.0 or norm <= 0:
            raise ValueError(f"bad MSE search settings grid={grid}, maxshrink={maxshrink}, norm={norm}")
        self.grid, self.maxshrink, self.norm = grid, maxshrink, norm
        super().__init__(*args, **kwargs)
        if self.clip_ratio != 1.0:
            raise ValueError("the MSE observer searches its own clip ratio; leave clip_ratio at 1.0")

    def _qparams(self, g: int) -> QParams:
        return mse_search(self._pool[g], self.bit_type, self.symmetric, self.grid, self.maxshrink, self.norm)


def mse_search(
    samples: torch.Tensor, bit_type, symmetric: bool, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4,
    full_range: bool = False,
) -> QParams:
    """Per-position shrink search over ``samples`` shaped ``[*positions, n]`` (see MseObserver)."""
    lo, hi = samples.amin(dim=-1), samples.amax(dim=-1)
    best = qparams_from_range(lo, hi, bit_type, symmetric, full_range)
    best_err = _err(samples, best, bit_type, norm)
    for i in range(1, max(1, int(maxshrink * grid))):
        r = 1.0 - i / grid
        cand = qparams_from_range(lo * r, hi * r, bit_type, symmetric, full_range)
        err = _err(samples, cand, bit_type, norm)
        better = err < best_err
        if better.any():
            best_err = torch.where(better, err, best_err)
            best = QParams(
                torch.where(better, cand.scale, best.scale),
                torch.where(better, cand.zero_point, best.zero_point),
            )
    return best


def _err(samples: torch.Tensor, qp: QParams, bit_type, norm: float) -> torch.Tensor:
    scale = qp.scale.unsqueeze(-1)
    zero = qp.zero_point.unsqueeze(-1)
    return (fake_quantize(samples, scale, zero, bit_type) - samples).abs_().pow_(norm).sum(dim=-1)
