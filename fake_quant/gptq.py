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
        refit_rounds: int = 0,
    ) -> WeightQuantResult:
        return self.quantize_many([weight], quantizer, blocksize, percdamp, act_order, static_groups,
                                  refit_rounds)[0]

    @torch.no_grad()
    def quantize_many(
        self,
        weights: list[torch.Tensor],
        quantizer: WeightQuantizer,
        blocksize: int = 128,
        percdamp: float = 0.01,
        act_order: bool = False,
        static_groups: bool = False,
        refit_rounds: int = 0,
    ) -> list[WeightQuantResult]:
        """Quantize several weights that read the same input (q, k and v; gate and up) against this one
        Hessian. GPTQ treats every output row on its own, so the rows are stacked and go through the column
        loop once; each result is the same as quantizing that weight alone, up to float summation order.

        ``refit_rounds`` > 0: after GPTQ, :meth:`refit_scales` gives every row the least-squares scale for
        its codes; each further round runs GPTQ again with those scales fixed and refits. The calibration
        output error of each refit is at most that of the GPTQ pass before it."""
        if self.nsamples == 0:
            raise RuntimeError("GPTQ has no calibration data: feed inputs with add_batch() first")
        for w in weights:
            if w.dim() != 2 or w.shape[1] != self.in_features:
                raise ValueError(f"weight has {w.shape[-1]} input columns, Hessian has {self.in_features}")
        if not percdamp > 0:
            raise ValueError(f"percdamp must be > 0, got {percdamp}")
        if refit_rounds < 0:
            raise ValueError(f"refit_rounds must be >= 0, got {refit_rounds}")
        t0 = time.perf_counter()
        sizes = [w.shape[0] for w in weights]
        W = torch.cat([w.detach().to(self.H.device, torch.float32) for w in weights], dim=0)
        W0 = W.clone() if refit_rounds else None
        Q, qparams, g_idx, losses, prep = self._quantize(W, quantizer, blocksize, percdamp, act_order, static_groups)
        best = None
        for r in range(refit_rounds):
            if r:
                Q, qparams, g_idx, losses, _ = self._quantize(W0.clone(), quantizer, blocksize, percdamp, act_order,
                                                              static_groups, fixed=(qparams, g_idx), prep=prep)
            Q, qparams = self.refit_scales(W0, Q, qparams, g_idx)
            err = self._row_errors(W0, Q)
            if best is None:
                best = (err, Q, qparams, g_idx, losses)
            else:  # a later GPTQ pass can land on worse codes: keep each row's best round
                better = err < best[0]
                best = (torch.where(better, err, best[0]), torch.where(better[:, None], Q, best[1]),
                        QParams(torch.where(_rows(better, qparams.scale), qparams.scale, best[2].scale),
                                torch.where(_rows(better, qparams.zero_point), qparams.zero_point,
                                            best[2].zero_point)),
                        g_idx, torch.where(better, losses, best[4]))
        if best is not None:
            _, Q, qparams, g_idx, losses = best
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
                  act_order: bool, static_groups: bool, fixed: tuple[QParams, torch.Tensor | None] | None = None,
                  prep: tuple | None = None):
        """GPTQ on a float32 ``W`` (modified in place). Returns (Q, qparams, g_idx, per-row losses, prep).
        ``fixed``: (qparams, g_idx) of an earlier pass, used instead of finding them (same groups).
        ``prep``: the dead columns, act-order permutation and inverse-Hessian factor of an earlier pass."""
        rows, cols = W.shape
        gs = quantizer.group_size
        if gs and cols % gs:
            raise ValueError(f"group size {gs} does not divide the {cols} input columns")
        bt = quantizer.bit_type

        if prep is None:  # the same for every round of one call: computed once (the inverse is O(cols^3))
            H = self.H.clone()
            dead = torch.diag(H) == 0
            H[dead, dead] = 1.0
            perm = invperm = None
            if act_order:
                perm = torch.argsort(torch.diag(H), descending=True)
                H = H[perm][:, perm]
                invperm = torch.argsort(perm)
            idx = torch.arange(cols, device=H.device)
            H[idx, idx] += percdamp * torch.mean(torch.diag(H))
            prep = (dead, perm, invperm, _upper_cholesky_of_inverse(H, percdamp))
            del H
        dead, perm, invperm, Hinv = prep
        W[:, dead] = 0.0

        group_params: list[QParams] = []
        if gs and static_groups:
            group_params = [quantizer.find_params(W[:, c:c + gs], per_row=True) for c in range(0, cols, gs)]
        if act_order:
            W = W[:, perm]

        Q = torch.zeros_like(W)
        losses = torch.zeros(rows, device=W.device)
        g_idx = torch.zeros(cols, dtype=torch.long, device=W.device) if gs else None
        if fixed is not None:
            fixed_qp, fixed_g = fixed
            if gs:
                fixed_g = fixed_g[perm] if act_order else fixed_g
                group_params = [QParams(fixed_qp.scale[:, k], fixed_qp.zero_point[:, k])
                                for k in range(fixed_qp.scale.shape[1])]
        qp = None if gs else (fixed[0] if fixed is not None else quantizer.find_params(W, per_row=True))

        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            # the block transposed: each column is a contiguous row, updated in place (fewer, cheaper ops
            # per column; the column loop is bound by per-op overhead, not arithmetic)
            WT = W[:, i1:i2].t().contiguous()
            QT = torch.empty_like(WT)
            ET = torch.empty_like(WT)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if gs:
                    if fixed is not None:
                        qp = group_params[int(fixed_g[col])]
                        g_idx[col] = fixed_g[col]
                    elif static_groups:
                        orig = int(perm[col]) if act_order else col
                        qp = group_params[orig // gs]
                        g_idx[col] = orig // gs
                    else:
                        if col % gs == 0:
                            current = torch.cat([WT[i:].t(), W[:, i2:]], dim=1)[:, :gs]
                            qp = quantizer.find_params(current, per_row=True)
                            group_params.append(qp)
                        g_idx[col] = len(group_params) - 1
                    scale, zero = qp.scale.float(), qp.zero_point.float()
                    sym = not bool(zero.any())
                elif i == 0 and i1 == 0:
                    scale, zero = qp.scale.float(), qp.zero_point.float()
                    sym = not bool(zero.any())
                w = WT[i]
                # fake_quantize(w, scale, zero): clamp(round(w / scale) + zero, qmin, qmax) - zero, times scale
                q = torch.round(w / scale)
                if not sym:
                    q.add_(zero)
                q.clamp_(bt.qmin, bt.qmax)
                if not sym:
                    q.sub_(zero)
                q.mul_(scale)
                QT[i] = q
                err = torch.sub(w, q, out=ET[i]).div_(Hinv1[i, i])
                WT[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Q[:, i1:i2] = QT.t()
            losses += (ET ** 2).sum(0) / 2  # sum over columns of (w - q)^2 / (2 d^2)
            W[:, i2:] -= ET.t() @ Hinv[i1:i2, i2:]

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
        return Q, qparams, g_idx, losses, prep

    def _row_errors(self, W0: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """Each row's calibration output error ``(w0 - q) H (w0 - q)^T``."""
        d = W0 - Q
        return ((d @ self.H) * d).sum(1)

    @torch.no_grad()
    def refit_scales(self, W0: torch.Tensor, Q: torch.Tensor, qparams: QParams,
                     g_idx: torch.Tensor | None) -> tuple[torch.Tensor, QParams]:
        """Keep GPTQ's integer codes and choose each row's scale(s) by least squares on the layer output:
        ``s = argmin (w0 - s c) H (w0 - s c)^T``, so the calibration output error can only go down.

        ``c = Q / s`` are the codes minus the zero point (integers), ``w0`` the float row. Per channel this
        is ``s = c H w0^T / c H c^T``; with groups, a ``G x G`` system per row. Rows whose system is
        degenerate (all codes zero) or gives a scale that is not positive keep their scale."""
        H = self.H
        scale, zero = qparams.scale.float(), qparams.zero_point
        grouped = g_idx is not None
        if grouped:
            ncols = W0.shape[1]
            groups = scale.shape[1]
            M = torch.zeros(ncols, groups, device=H.device)
            M[torch.arange(ncols, device=H.device), g_idx] = 1.0
            s_col = scale[:, g_idx]
        else:
            s_col = scale.reshape(-1, 1)
        C = torch.where(s_col > 0, Q / s_col, torch.zeros_like(Q)).round()
        if not grouped:
            CH = C @ H
            num = (CH * W0).sum(1)
            den = (CH * C).sum(1)
            new = torch.where(den > 0, num / den.clamp_min(1e-30), scale.reshape(-1))
            new = torch.where(new > 0, new, scale.reshape(-1)).reshape(scale.shape)
        else:
            rows = W0.shape[0]
            A = torch.zeros(rows, groups, groups, device=H.device)
            b = torch.zeros(rows, groups, device=H.device)
            for h in range(groups):
                CHh = (C * M[:, h]) @ H
                A[:, :, h] = (CHh * C) @ M
                b[:, h] = (CHh * W0).sum(1)
            ok = torch.diagonal(A, dim1=1, dim2=2).gt(0).all(1)
            eye = torch.eye(groups, device=H.device)
            A = torch.where(ok[:, None, None], A, eye)
            sol, info = torch.linalg.solve_ex(A, b.unsqueeze(-1))
            new = sol.squeeze(-1)
            good = ok & (info == 0) & (new > 0).all(1) & torch.isfinite(new).all(1)
            new = torch.where(good[:, None], new, scale)
        s_col = new[:, g_idx] if grouped else new.reshape(-1, 1)
        return C * s_col, QParams(new.to(qparams.scale.dtype), zero)

    def free(self) -> None:
        self.H = None


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row mask shaped to broadcast against ``like`` (``[rows]`` or ``[rows, groups]``)."""
    return mask if like.dim() == 1 else mask[:, None]


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
