"""The paper's W4A8 pipeline in every dtype a GPU run uses, against the FP32 model on the CPU.

    python bench/cuda_check.py [--device cuda] [--dtypes float32,bfloat16,float16]
                                [--families qwen2vl,qwen2_5vl,llava,internvl2]

For each tiny random model family and each dtype it runs the exam entry point (rotation, online
Hadamard, GPTQ W4 with act-order, static A8 with MSQ; then once more with AIFS and RMS) on
``--device`` and prints a Markdown table of the relative logit error on 6 held-out built-in rows,
measured against the unquantized model in float32 on the CPU, plus the rotation-only error (which
must be rounding noise of the dtype). The tests cover float32 on the CPU; this shows what changes
on a GPU and in half precision.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from evaluation.builtin import builtin_rows  # noqa: E402
from exam.common import main as exam_main  # noqa: E402
from model import registry  # noqa: E402
from model.base import Sample  # noqa: E402

W4A8 = ["--rotate", "--rotate_visual_clip", "--rotate_visual_cross_attn", "--rotate_llm", "--online_llm_hadamard",
        "--online_visual_hadamard", "--visual_w_bits", "4", "--visual_a_bits", "8", "--llm_w_bits", "4",
        "--llm_a_bits", "8", "--quant", "--quant_llm", "--quant_visual_clip", "--quant_cross_attention",
        "--visual_w_clip", "--llm_w_clip", "--visual_static", "--llm_static", "--act_order",
        "--nsamples", "8", "--calib_num", "16"]
ROTATE_ONLY = ["--rotate", "--rotate_visual_clip", "--rotate_visual_cross_attn", "--rotate_llm",
               "--online_llm_hadamard", "--online_visual_hadamard"]
SETTINGS = {"rotation only": ROTATE_ONLY, "W4A8 MQuant": W4A8,
            "W4A8 MQuant + AIFS + RMS": [*W4A8, "--aifs", "--visual_split", "--llm_split"]}


def held_out(adapter, loaded, device):
    rows = builtin_rows(60, seed=42)[40:46]  # the exam calibrates on rows 0..15
    return [adapter.build_inputs(loaded, Sample([r["image"]], r["question"]), device) for r in rows]


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b, use_cache=False).logits[0].float().cpu() for b in batches])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--families", default="qwen2vl,qwen2_5vl,llava,internvl2")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{name}, torch {torch.__version__}; relative logit error ||y - y_fp32_cpu|| / ||y_fp32_cpu|| "
          f"on 6 held-out rows\n")
    print("| family | dtype | setting | rel. error | seconds |")
    print("|---|---|---|---|---|")
    out_root = tempfile.mkdtemp(prefix="mquant-cuda-check-")
    for family in args.families.split(","):
        ad = registry.get(family)
        fp = ad.load("tiny", "cpu", torch.float32)
        ref = logits(fp.model, held_out(ad, fp, "cpu"))
        for dtype in args.dtypes.split(","):
            for setting, flags in SETTINGS.items():
                t0 = time.perf_counter()
                out = exam_main(family, ["--model_path", "tiny", "--device", args.device, "--dtype", dtype,
                                         "--output_dir", os.path.join(out_root, f"{family}-{dtype}-{len(flags)}"),
                                         *flags])
                seconds = time.perf_counter() - t0
                y = logits(out["loaded"].model, held_out(ad, out["loaded"], args.device))
                err = float((y - ref).norm() / ref.norm())
                print(f"| {family} | {dtype} | {setting} | {err:.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
