"""The RMSNorm of InternViT-6B (and its qk normalization) and of InternLM2: statistics in float32, the result cast
back to the input dtype before the scale is applied, as in the original checkpoints' code."""
from __future__ import annotations

import torch
from torch import nn


class InternRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
