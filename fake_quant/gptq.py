"""GPTQ and round-to-nearest for linear layers.

GPTQ (Frantar et al., 2022) quantizes a weight one input column at a time and spreads each
column's rounding error over the not-yet-quantized columns, weighted by the inverse Hessian
``H = 2/N * sum_n x_n x_n^T`` of the layer inputs, so the layer *output* error stays small.
Both GPTQ and RTN report the mean squared output error on the calibration inputs
(``tr(dW H dW^T) / (2 * rows)``), so callers can log and compare them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .qparams import QParams, fake_quantize
from .quant_utils import WeightQuantizer


@dataclass
class WeightQuantResult:
    weight: torch.Tensor          # fake-quantized weight, original column order, original dtype
    qparams: QParams              # [rows] per channel, or [rows, n_groups] with groups
    g_idx: torch.Tensor | None    # group index of every input column (None without groups)
    loss: float                   # GPTQ's objective: sum over columns of (w - q)^2 / (2 d^2)
    output_mse: float             # mean squared output error on the calibration inputs (nan without H)
    seconds: float


class GPTQ:
    """Accumulates the Hessian of one linear layer's inputs, then quantizes its weight."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    @classmethod
    def for_layer(cls, layer: nn.Linear) -> "GPTQ":
        return cls(layer.in_features, device=layer.weight.device)

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add calibration inputs ``[..., in_features]``; every row (token) is one sample."""
        if inp.shape[-1] != self.in_features:
            raise ValueError(f"input has {inp.shape[-1]} features, layer expects {self.in_features}")
        x = inp.reshape(-1, self.in_features).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        self.H.mul_(self.nsamples / (self.nsamples + n))
        self.nsamples += n
        x = x * math.sqrt(2.0 / self.nsamples)
        self.H.addmm_(x.t(), x)

    def hook(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook that feeds the module's input: ``layer.register_forward_hook(g.hook)``."""
        self.add_batch(args[0])

    @torch.no_grad()
    def output_mse(self, weight: torch.Tensor, quantized: torch.Tensor) -> float:
        delta = (weight.to(self.H.device, torch.float32) - quantized.to(self.H.device, torch.float32))
        return float(((delta @ self.H) * delta).sum() / (2 * delta.shape[0]))

    @torch.no_grad()
    def rtn(self, weight: torch.Tensor, quantizer: WeightQuantizer) -> WeightQuantResult:
        res = rtn_quantize(weight, quantizer)
        res.output_mse = self.output_mse(weight, res.weight)
        return res

    @torch.no_grad()
    def quantize(
        self,
        weight: torch.Tensor,
        quantizer: WeightQuantizer,
        blocksize: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
    ) -> WeightQuantResult:
        return self.quantize_many([weight], quantizer, blocksize, percdamp, act_order, static_groups)[0]

    @torch.no_grad()
    def quantize_many(
        self,
        weights: list[torch.Tensor],
        quantizer: WeightQuantizer,
        blocksize: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
    ) -> list[WeightQuantResult]:
        """Quantize several weights that read the same input (q, k and v; gate and up) against this one
        Hessian. GPTQ treats every output row on its own, so the rows are stacked and go through the column
        loop once; each result is the same as quantizing that weight alone, up to float summation order."""
        if self.nsamples == 0:
            raise RuntimeError("GPTQ has no calibration data: feed inputs with add_batch() first")
        for w in weights:
            if w.dim() != 2 or w.shape[1] != self.in_features:
                raise ValueError(f"weight has {w.shape[-1]} input columns, Hessian has {self.in_features}")
        if not percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {percdamp}")
        t0 = time.perf_counter()
        sizes = [w.shape[0] for w in weights]
        W = torch.cat([w.detach().to(self.H.device, torch.float32) for w in weights], dim=0)
        Q, qparams, g_idx, losses = self._quantize(W, quantizer, blocksize, percdamp, act_order, static_groups)
        seconds = time.perf_counter() - t0
        out = []
        for w, q, sc, zp, loss in zip(weights, Q.split(sizes), qparams.scale.split(sizes),
                                      qparams.zero_point.split(sizes), losses.split(sizes)):
            out.append(WeightQuantResult(
                weight=q.to(w.device, w.dtype, copy=True),  # own storage, not views of the stacked tensors
                qparams=QParams(sc.clone(), zp.clone()),
                g_idx=None if g_idx is None else g_idx.clone(),
                loss=float(loss.sum()),
                output_mse=self.output_mse(w, q),
                seconds=seconds * w.shape[0] / sum(sizes),
            ))
        return out

    def _quantize(self, W: torch.Tensor, quantizer: WeightQuantizer, blocksize: int, percdamp: float,
                  act_order: bool, static_groups: bool):
        """GPTQ on a float32 ``W`` (modified in place). Returns (Q, qparams, g_idx, per-row losses)."""
        rows, cols = W.shape
        gs = quantizer.group_size
        if gs and cols % gs:
            raise ValueError(f"group size {gs} does not divide the {cols} input columns")
        bt = quantizer.bit_type

        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        group_params: list[QParams] = []
        if gs and static_groups:
            group_params = [quantizer.find_params(W[:, c:c + gs], per_row=True) for c in range(0, cols, gs)]

        perm = invperm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
            invperm = torch.argsort(perm)

        idx = torch.arange(cols, device=H.device)
        H[idx, idx] += percdamp * torch.mean(torch.diag(H))
        Hinv = _upper_cholesky_of_inverse(H, percdamp)
        del H

        Q = torch.zeros_like(W)
        losses = torch.zeros(rows, device=W.device)
        g_idx = torch.zeros(cols, dtype=torch.long, device=W.device) if gs else None
        qp = None if gs else quantizer.find_params(W, per_row=True)

        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if gs:
                    if static_groups:
                        orig = int(perm[col]) if act_order else col
                        qp = group_params[orig // gs]
                        g_idx[col] = orig // gs
                    else:
                        if col % gs == 0:
                            current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                            qp = quantizer.find_params(current, per_row=True)
                            group_params.append(qp)
                        g_idx[col] = len(group_params) - 1
                w = W1[:, i]
                d = Hinv1[i, i]
                q = fake_quantize(w, qp.scale, qp.zero_point, bt)
                Q1[:, i] = q
                losses += (w - q) ** 2 / d**2 / 2
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if act_order:
            Q = Q[:, invperm]
            if g_idx is not None:
                g_idx = g_idx[invperm]
        if gs:
            qparams = QParams(
                torch.stack([p.scale for p in group_params], dim=1),
                torch.stack([p.zero_point for p in group_params], dim=1),
            )
        else:
            qparams = qp
        return Q, qparams, g_idx, losses

    def free(self) -> None:
        self.H = None


def _upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError as e:
        raise RuntimeError(
            f"GPTQ: the damped Hessian is not positive definite (percdamp={percdamp}); raise "
            "--percdamp or use more calibration samples (--nsamples)"
        ) from e


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, quantizer: WeightQuantizer) -> WeightQuantResult:
    """Round-to-nearest with ``quantizer`` (no calibration data needed)."""
    t0 = time.perf_counter()
    qp = quantizer.find_params(weight)
    q = quantizer.quantize(weight, qp)
    cols = weight.shape[1]
    g_idx = None
    if quantizer.group_size:
        g_idx = torch.arange(cols, device=weight.device) // quantizer.group_size
    return WeightQuantResult(
        weight=q.to(weight.dtype),
        qparams=qp,
        g_idx=g_idx,
        loss=float("nan"),
        output_mse=float("nan"),
        seconds=time.perf_counter() - t0,
    )
