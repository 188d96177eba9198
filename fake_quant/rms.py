"""RMS -- rotation magnitude suppression.

An online Hadamard before an MLP output layer folds ``H~^T`` into its weight: with a normalized
Hadamard matrix (first column all +1) column 0 of the folded weight is ``sqrt(d) * mean(W, dim=1)``
for every row. When ``sqrt(d) * |mean_j| > max_i |W_ji|`` that one column sets row j's weight scale
and coarsens the grid for all the others. RMS moves column 0 (and input channel 0 of the
transformed activation) into its own small branch:

    y = main(x~[..., 1:]) + branch(x~[..., :1])        x~ = H~ x

``main`` is quantized as usual; ``branch`` (d_out x 1) gets its own weight and activation scales
(the paper's W4A8 GEMV branch), or stays in floating point (``keep_fp``). With quantization off the
split layer computes exactly what the unsplit one did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .quant_utils import QuantLinear


def rms_condition(weight: torch.Tensor) -> torch.Tensor:
    """Bool per output row: ``sqrt(d) * |row mean| > max |row|`` (weight *before* the Hadamard fold)."""
    w = weight.double()
    d = w.shape[1]
    return math.sqrt(d) * w.mean(dim=1).abs() > w.abs().amax(dim=1)


@dataclass
class SplitReport:
    rows_meeting_condition: float   # fraction of output rows
    split: bool
    scale_reduction: float          # mean over rows of max|row| before / after removing column 0


class SplitQuantLinear(nn.Module):
    """online Hadamard -> [channel 0 -> ``branch``] + [channels 1.. -> ``main``]."""

    def __init__(self, folded: QuantLinear, keep_fp: bool = False) -> None:
        super().__init__()
        if folded.online_rotation is None:
            raise ValueError("RMS splits layers that apply an online Hadamard")
        W = folded.weight.data
        out_f, in_f = W.shape
        main = nn.Linear(in_f - 1, out_f, bias=folded.bias is not None, dtype=W.dtype, device=W.device)
        branch = nn.Linear(1, out_f, bias=False, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            main.weight.copy_(W[:, 1:])
            branch.weight.copy_(W[:, :1])
            if folded.bias is not None:
                main.bias.copy_(folded.bias)
        self.online_rotation = folded.online_rotation
        self.main = QuantLinear(main)
        self.branch = QuantLinear(branch)
        self.branch.keep_fp = keep_fp  # the pipeline leaves a keep_fp branch unquantized
        self.in_features, self.out_features = in_f, out_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # realized with a static scale, the main part quantizes its input inside the rotation (fake_quant.realize)
        fused = getattr(self.main, "can_quantize_in_rotation", None)
        if fused is not None and fused():
            out = self.main.rotate_and_quantize(x, self.online_rotation, skip=1)
            if out is not None:
                y, lead = out
                lead_shape = (*x.shape[:-1], self.out_features)
                return y.reshape(lead_shape) + self.branch(lead.reshape(*x.shape[:-1], 1)).reshape(lead_shape)
        x = self.online_rotation(x)
        return self.main(x[..., 1:]) + self.branch(x[..., :1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, split channel 0, keep_fp={self.branch.keep_fp}"


def split_report(weight_before_fold: torch.Tensor, folded: torch.Tensor, threshold: float) -> SplitReport:
    frac = float(rms_condition(weight_before_fold.detach()).double().mean())
    f = folded.detach().double().abs()
    before = f.amax(dim=1)
    after = f[:, 1:].amax(dim=1)
    reduction = float((before / after.clamp_min(1e-30)).mean())
    return SplitReport(rows_meeting_condition=frac, split=frac > threshold, scale_reduction=reduction)
