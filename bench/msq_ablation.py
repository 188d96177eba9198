"""Ablation in the spirit of the paper's: static W4A8 single-scale baseline -> +MSQ -> +MSQ+AIFS -> +RMS.

Each setting runs the full pipeline (rotation, online Hadamard, GPTQ W4, static A8) through
``exam/quant_qwen2vl.py`` on the same model and calibration rows, then measures, on held-out rows of the
built-in set (never used for calibration), the KL divergence of the next-token distributions from the
floating-point model's (mean over all positions) and the relative logit error.

    python bench/msq_ablation.py [--model_path tiny] [--rows 16]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluation.builtin import builtin_rows  # noqa: E402
from exam.common import main as quantize  # noqa: E402
from model import registry  # noqa: E402
from model.base import Sample  # noqa: E402

BASE = ("--rotate --rotate_visual_clip --rotate_llm --online_visual_hadamard --online_llm_hadamard --quant "
        "--quant_visual_clip --quant_cross_attention --quant_llm --visual_w_bits 4 --llm_w_bits 4 --visual_a_bits 8 "
        "--llm_a_bits 8 --visual_static --llm_static --act_order").split()
SETTINGS = [
    ("static W4A8, one scale (baseline)", ["--no_msq"]),
    ("+ MSQ", []),
    ("+ MSQ + AIFS", ["--aifs"]),
    ("+ MSQ + AIFS + RMS", ["--aifs", "--visual_split", "--llm_split"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default="tiny")
    ap.add_argument("--family", default="qwen2vl")
    ap.add_argument("--rows", type=int, default=16, help="held-out rows to score")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib_num", type=int, default=32)
    args = ap.parse_args()
    logging.disable(logging.INFO)
    torch.set_grad_enabled(False)

    adapter = registry.get(args.family) if args.model_path == "tiny" else registry.for_checkpoint(args.model_path, args.family)
    fp = adapter.load(args.model_path, "cpu", torch.float32)
    start = max(args.nsamples, args.calib_num) + 1
    rows = builtin_rows(start + args.rows, seed=42)[start:]
    batches = [adapter.build_inputs(fp, Sample([r["image"]], r["question"]), "cpu") for r in rows]
    ref = [fp.model(**b, use_cache=False).logits.float() for b in batches]
    del fp

    print(f"model: {args.model_path} ({args.family}); calibration rows 0..{start - 2} of the built-in set; "
          f"scored on rows {start}..{start + args.rows - 1}\n")
    print("| setting | KL(FP || quantized) per token | relative logit error | layers split by RMS |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SETTINGS:
            with contextlib.redirect_stdout(io.StringIO()):
                out = quantize(args.family, ["--model_path", args.model_path, "--output_dir", tmp, "--nsamples",
                                             str(args.nsamples), "--calib_num", str(args.calib_num), *BASE, *extra])
            model = out["loaded"].model
            kls, num, den = [], 0.0, 0.0
            for b, r in zip(batches, ref):
                q = model(**b, use_cache=False).logits.float()
                p_log, q_log = torch.log_softmax(r, -1), torch.log_softmax(q, -1)
                kls.append(float((p_log.exp() * (p_log - q_log)).sum(-1).mean()))
                num += float((q - r).pow(2).sum())
                den += float(r.pow(2).sum())
            rms = out["results"]["pipeline"]["rotation"]
            split = sum(v["split"] for part in rms.values() for v in part.get("rms", {}).values())
            print(f"| {name} | {sum(kls) / len(kls):.2e} | {(num / den) ** 0.5:.4f} | {split} |", flush=True)


if __name__ == "__main__":
    main()
