"""GPTQ speed and quality on LLM-sized layers, on this machine.

For each layer shape, builds a Hessian from ``--tokens`` correlated calibration rows, runs GPTQ
(W4, per channel, block size 128), GPTQ with the scale refit (``--refit_rounds``, the pipeline's default) and
RTN, and prints a Markdown table: seconds for the Hessian and for both GPTQ runs, and the output MSE of all
three on the calibration rows.

    python bench/gptq_speed.py [--tokens 8192] [--shapes 4096x4096,3584x18944] [--refit_rounds 2] [--device cpu]

Shapes are ``out x in``: 3584x18944 is Qwen2-VL-7B's down_proj.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fake_quant.config import GPTQConfig  # noqa: E402
from fake_quant.gptq import GPTQ  # noqa: E402
from fake_quant.quant_utils import WeightQuantizer  # noqa: E402


def correlated_rows(n: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    """Rows with a decaying spectrum (a low-rank-ish structure, as transformer activations have)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rank = min(d, 512)
    latent = torch.randn(n, rank, generator=g) * torch.logspace(0, -2, rank)
    basis = torch.randn(rank, d, generator=g) / rank**0.5
    noise = 0.1 * torch.randn(n, d, generator=g)
    return (latent @ basis + noise).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", default="4096x4096,3584x18944")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--refit_rounds", type=int, default=GPTQConfig.refit_rounds)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    dev = args.device
    if dev.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        from fake_quant import cpu_isa

        name = f"{cpu_isa.detect().describe()}; {torch.get_num_threads()} threads"
    print(f"device: {dev} ({name}); torch {torch.__version__}; {args.tokens} calibration tokens; W{args.bits} per channel\n")
    r = args.refit_rounds
    print(f"| layer (out x in) | Hessian s | GPTQ s | GPTQ + {r} refit rounds s | RTN output MSE | GPTQ output MSE | "
          f"GPTQ / RTN | with refit / RTN |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        x = correlated_rows(args.tokens, in_f, dev)
        w = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) / in_f**0.5).to(dev)
        t0 = time.perf_counter()
        g = GPTQ(in_f, device=dev)
        for chunk in x.split(1024):
            g.add_batch(chunk)
        _sync(dev)
        t_h = time.perf_counter() - t0
        del x
        wq = WeightQuantizer(bits=args.bits)
        res = g.quantize(w, wq)
        _sync(dev)
        ref = g.quantize(w, wq, refit_rounds=r)
        _sync(dev)
        rtn = g.rtn(w, wq)
        print(f"| {out_f} x {in_f} | {t_h:.1f} | {res.seconds:.1f} | {ref.seconds:.1f} | {rtn.output_mse:.3e} | "
              f"{res.output_mse:.3e} | {res.output_mse / rtn.output_mse:.3f} | {ref.output_mse / rtn.output_mse:.3f} |",
              flush=True)
        del g, w, res, ref, rtn


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
