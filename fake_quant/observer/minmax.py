"""Running min/max: the range of everything seen so far."""
from __future__ import annotations

import torch

from .base import Observer, register_observer


@register_observer
class MinMaxObserver(Observer):
    name = "minmax"

    def reset(self) -> None:
        super().reset()
        self._lo: list[torch.Tensor | None] = [None] * self.num_row_groups
        self._hi: list[torch.Tensor | None] = [None] * self.num_row_groups

    def _update_group(self, g: int, view: torch.Tensor) -> None:
        lo, hi = view.amin(dim=-1), view.amax(dim=-1)
        if self._lo[g] is None:
            self._lo[g], self._hi[g] = lo, hi
        else:
            if lo.shape != self._lo[g].shape:
                raise ValueError(
                    f"statistics shape changed between updates ({tuple(self._lo[g].shape)} -> "
                    f"{tuple(lo.shape)}): per-row statistics need inputs with the same rows"
                )
            self._lo[g] = torch.minimum(self._lo[g], lo)
            self._hi[g] = torch.maximum(self._hi[g], hi)

    def _range(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lo[g], self._hi[g]
