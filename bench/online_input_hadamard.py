"""Run-time cost of the online Hadamard transforms on linear inputs, on one GLM-4V EVA2-CLIP block at its real widths.

    python bench/online_input_hadamard.py [--tokens 1024] [--device cpu] [--dtype float32] [--repeat 3]

The tower's norms sit on the branch outputs, so its stream cannot be rotated offline; ``--online_visual_hadamard``
transforms the input of ``fc2`` at run time (the paper's site) and ``--online_visual_input_hadamard`` adds the inputs
of ``query_key_value`` and ``fc1``. Prints two Markdown tables: each linear with and without the transform of its
input (best of ``repeat``), and the whole block (1792 wide, 16 heads, MLP 15360) plain, with the paper's site and
with all three (best of ``repeat`` runs interleaved between the three), with the max difference of the block's
output against the plain block (the transforms are exact).
One image is 6401 tokens; the linears' share scales with tokens, the attention's with tokens squared.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fake_quant import hadamard_utils as hu  # noqa: E402
from fake_quant import rotation_utils as ru  # noqa: E402
from model.glm4v.config import VisionConfig  # noqa: E402
from model.glm4v.vision import TransformerLayer  # noqa: E402

QKV, FC1, FC2 = "attention.query_key_value", "mlp.fc1", "mlp.fc2"


def best_time(fn, repeat: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dev, dtype = args.device, getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {dev} ({name}); torch {torch.__version__}; {args.dtype}; {args.tokens} tokens\n")
    torch.manual_seed(0)
    v = VisionConfig()
    plain = TransformerLayer(v).to(dev, dtype).eval()
    x = torch.randn(1, args.tokens, v.hidden_size, device=dev, dtype=dtype)

    print("| layer | in -> out | linear s | online transform s | transform / linear |")
    print("|---|---|---|---|---|")
    for path in (QKV, FC1, FC2):
        lin = plain.get_submodule(path)
        inp = torch.randn(args.tokens, lin.in_features, device=dev, dtype=dtype)
        online = hu.OnlineHadamard(lin.in_features)
        online(inp[:2])  # build the plan's matrices once
        t_lin = best_time(lambda lin=lin, inp=inp: lin(inp), args.repeat, dev)
        t_had = best_time(lambda online=online, inp=inp: online(inp), args.repeat, dev)
        print(f"| {path} | {lin.in_features} -> {lin.out_features} | {t_lin:.4f} | {t_had:.4f} | "
              f"{100 * t_had / t_lin:.1f}% |", flush=True)

    paper, ours = copy.deepcopy(plain), copy.deepcopy(plain)
    ru.online_hadamard_at(paper, FC2)
    for path in (QKV, FC1, FC2):
        ru.online_hadamard_at(ours, path)
    ref = plain(x)
    rows = (("plain", plain, "none"), ("--online_visual_hadamard", paper, "fc2"),
            ("+ --online_visual_input_hadamard", ours, "query_key_value, fc1, fc2"))
    times = {label: float("inf") for label, _, _ in rows}
    for _ in range(args.repeat):  # interleaved, so that a change in the machine's load hits all three alike
        for label, blk, _ in rows:
            times[label] = min(times[label], best_time(lambda blk=blk: blk(x), 1, dev))
    print("\n| block | online sites | s | vs plain | max abs diff of the output |")
    print("|---|---|---|---|---|")
    for label, blk, sites in rows:
        diff = float((blk(x).float() - ref.float()).abs().max())
        print(f"| {label} | {sites} | {times[label]:.4f} | {times[label] / times['plain']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
