"""Core self-check: quantize a synthetic two-modality MLP with the fake_quant core and print a
Markdown table of output errors on held-out inputs.

Inputs mimic what an MLLM's linear layers see: two row populations ("visual" rows with a much
wider range than "text" rows) and a few outlier channels. Calibration rows and evaluation rows
come from different seeds, so nothing is scored on the data it was calibrated on.

    python -m fake_quant.selfcheck [--dim 192] [--hidden 512] [--tokens 2048]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .gptq import GPTQ
from .quant_utils import ActQuantizer, QuantLinear, RowGroupContext, WeightQuantizer


def synthetic_tokens(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows, the first half "visual" (group 0), the rest "text" (group 1)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(1234)) / dim**0.5
    latent = torch.randn(n, dim, generator=g) * torch.logspace(0, -1.5, dim)
    x = latent @ mix
    x[:, :4] *= 12.0                      # outlier channels, shared by both populations
    groups = torch.zeros(n, dtype=torch.long)
    groups[n // 2:] = 1
    x[n // 2:] *= 0.08                    # text rows: a much narrower range
    return x, groups


def build_mlp(dim: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def quantize(mlp: nn.Sequential, calib: torch.Tensor, calib_groups: torch.Tensor, ctx: RowGroupContext, *,
             gptq: bool, act_order: bool = False, act: str | None = None,
             row_groups: int = 1) -> tuple[nn.Sequential, float]:
    """Return a fake-quantized copy of ``mlp`` (W4, optional A8) and the seconds it took.
    Static quantizers with several row groups read each row's group from ``ctx``."""
    t0 = time.perf_counter()
    q = build_mlp(mlp[0].in_features, mlp[0].out_features)
    q.load_state_dict(mlp.state_dict())
    for i in (0, 2):
        inq = None
        if act == "dynamic":
            inq = ActQuantizer(8, True, "token")
        elif act == "static":
            inq = ActQuantizer(8, True, "tensor", static=True, num_row_groups=row_groups, context=ctx)
        q[i] = QuantLinear(q[i], input_quantizer=inq, weight_quantizer=WeightQuantizer(4))
    # layer by layer, each seeing the inputs produced by the already-quantized layers before it
    x = calib
    ctx.set(calib_groups)
    for i in (0, 2):
        layer = q[i]
        if gptq:
            g = GPTQ(layer.in_features)
            g.add_batch(x)
            res = g.quantize(layer.weight, layer.weight_quantizer, act_order=act_order)
            layer.set_quantized_weight_(res.weight, res.qparams)
        else:
            layer.quantize_weight_()
        if layer.input_quantizer is not None and layer.input_quantizer.static:
            layer.input_quantizer.start_calibration()
            layer.input_quantizer(x)
            layer.input_quantizer.freeze()
        x = layer(x)
        if i == 0:
            x = q[1](x)
    ctx.clear()
    return q, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    mlp = build_mlp(args.dim, args.hidden)
    calib, cg = synthetic_tokens(args.tokens, args.dim, seed=1)
    evalx, eg = synthetic_tokens(args.tokens, args.dim, seed=2)
    ref = mlp(evalx)

    def rel_err(y: torch.Tensor, mask: torch.Tensor) -> float:
        return float((y[mask] - ref[mask]).norm() / ref[mask].norm())

    runs = [
        ("W4 RTN", dict(gptq=False)),
        ("W4 GPTQ", dict(gptq=True)),
        ("W4 GPTQ act_order", dict(gptq=True, act_order=True)),
        ("W4A8 GPTQ, dynamic per-token", dict(gptq=True, act="dynamic")),
        ("W4A8 GPTQ, static per-tensor, one scale", dict(gptq=True, act="static")),
        ("W4A8 GPTQ, static per-tensor, a scale per row group", dict(gptq=True, act="static", row_groups=2)),
    ]
    print(f"MLP {args.dim}->{args.hidden}->{args.dim}; calibration: {args.tokens} rows (seed 1); "
          f"evaluation: {args.tokens} other rows (seed 2); relative output error ||y_q - y|| / ||y||\n")
    print("| setting | wide rows (group 0) | narrow rows (group 1) | seconds |")
    print("|---|---|---|---|")
    rows = []
    for name, kw in runs:
        ctx = RowGroupContext()
        q, secs = quantize(mlp, calib, cg, ctx, **kw)
        ctx.set(eg)  # once per forward; every quantizer of the model reads it
        y = q(evalx)
        r = {"setting": name, "group0": rel_err(y, eg == 0), "group1": rel_err(y, eg == 1), "seconds": secs}
        rows.append(r)
        print(f"| {name} | {r['group0']:.4f} | {r['group1']:.4f} | {secs:.2f} |")
    return rows


if __name__ == "__main__":
    main()
