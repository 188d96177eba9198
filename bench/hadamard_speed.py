"""Speed of the fast Hadamard transform vs a dense matrix product, on this machine.

    python bench/hadamard_speed.py [--sizes 4096,4304,13696,14336,18944] [--tokens 2048] [--device cpu] [--repeat 3]

Prints a Markdown table: the construction used, the best-of-``repeat`` seconds of
``hadamard_transform(x)`` and of ``x @ H.T / sqrt(n)`` (the dense matrix built beforehand, not
timed), their ratio and the max abs difference between the two results. The defaults include the
two widths whose K-blocks come from the Goethals-Seidel (13696 = 428 * 2^5) and Miyamoto
(4304 = 1076 * 2^2) constructions, where the dense K x K factor is largest.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fake_quant import hadamard_utils as hu  # noqa: E402


def best_time(fn, repeat: int, device: str) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,4304,13696,14336,18944")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"{platform.machine()}, {torch.get_num_threads()} threads"
    kernel = "fast_hadamard_transform" if dev.startswith("cuda") and hu._fast_kernel() else "torch butterfly"
    print(f"device: {dev} ({name}); torch {torch.__version__}; fp32; {args.tokens} tokens; power-of-two part: {kernel}\n")
    print("| n | construction | transform s | dense s | dense / transform | max abs diff |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(args.tokens, n, device=dev)
        h = hu.hadamard_matrix(n, dtype=torch.float32, device=dev)
        plan = hu.get_plan(n)
        hu.hadamard_transform(x[:2], plan=plan)  # warm the caches
        t_fast, y_fast = best_time(lambda x=x, plan=plan: hu.hadamard_transform(x, plan=plan), args.repeat, dev)
        t_dense, y_dense = best_time(lambda x=x, h=h, n=n: (x @ h.t()) / math.sqrt(n), args.repeat, dev)
        diff = float((y_fast - y_dense).abs().max())
        print(f"| {n} | {hu.construction(n)} | {t_fast:.4f} | {t_dense:.4f} | {t_dense / t_fast:.1f}x | {diff:.1e} |", flush=True)
        del x, h, y_fast, y_dense


if __name__ == "__main__":
    main()
