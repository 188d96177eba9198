"""The main demo: MQuant on MiniVLM (real weights), scored on SynthBench.

Builds MiniVLM (converting the packaged models on first use), then for each setting quantizes a fresh copy and
answers the three SynthBench evaluation subsets; calibration uses the SynthBench calibration files (another seed).
Prints a Markdown table (scores in percent, wall time) and writes it to ``outputs/demo/summary.json`` as
``{setting: {subset: score, ...}, ...}``.

    python exam/demo_minivlm.py [--eval_num N] [--output_dir outputs/demo]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evaluation import datasets, synthbench  # noqa: E402
from evaluation.eval import evaluate  # noqa: E402
from exam.common import build_parser, config_from_args  # noqa: E402
from fake_quant import pipeline  # noqa: E402
from model.base import Sample  # noqa: E402
from model.registry import get  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluation", "synthbench_data")
ROT = "--rotate --rotate_visual_clip --rotate_llm --online_visual_hadamard --online_llm_hadamard".split()
QUANT = "--quant --quant_visual_clip --quant_cross_attention --quant_llm --act_order --visual_w_clip --llm_w_clip".split()
SETTINGS = [
    ("FP32", []),
    ("W8A8 MQuant (static)", ROT + QUANT + "--visual_w_bits 8 --llm_w_bits 8 --visual_static --llm_static --aifs".split()),
    ("W4A8 RTN, dynamic per-token", QUANT[:4] + "--visual_w_rtn --llm_w_rtn".split()),
    ("W4A8 static, one scale", ROT + QUANT + "--visual_static --llm_static --no_msq".split()),
    ("W4A8 MQuant (static, MSQ + AIFS + RMS)", ROT + QUANT + "--visual_static --llm_static --aifs --visual_split --llm_split".split()),
    ("W4A8 MQuant + sink scale", ROT + QUANT + "--visual_static --llm_static --aifs --visual_split --llm_split --sink_scale".split()),
]


def percent(subset: str, scores: dict) -> float:
    if subset == "SynthBench_YN":  # MME-style: each category's acc + acc+ is out of 200
        cats = [k for k in scores if k not in ("perception", "reasoning")]
        return sum(scores[c] for c in cats) / (2 * len(cats))
    return scores["Overall"]


def calibration_rows(nsamples: int, calib_num: int) -> list[dict]:
    """An even spread over the three SynthBench calibration files (never the evaluation files)."""
    rows = [r for s in synthbench.SUBSETS for r in datasets.load_rows(DATA, f"{s}_calib")]
    return rows[:: max(1, len(rows) // max(nsamples, calib_num))]


def evaluation_rows(eval_num: int | None) -> dict[str, list[dict]]:
    return {s: datasets.load_rows(DATA, s)[:eval_num] for s in synthbench.SUBSETS}


def quantized_minivlm(adapter, flags: list[str], calib_rows: list[dict], nsamples: int, calib_num: int):
    """A fresh MiniVLM, quantized with the exam flags ``flags`` (none: FP32)."""
    loaded = adapter.load("minivlm", "cpu", torch.float32)
    if flags:
        cfg = config_from_args(build_parser("llava").parse_args(
            ["--model_path", "minivlm", "--nsamples", str(nsamples), "--calib_num", str(calib_num), *flags]))
        batches = [adapter.build_inputs(loaded, Sample([datasets.image_of(r)], r["question"]), "cpu")
                   for r in calib_rows]
        pipeline.run(cfg, adapter, loaded, batches[:nsamples], batches[:calib_num])
    return loaded


def projector_digest() -> str:
    """Identifies the trained projector, so cached predictions of another one are never reused."""
    from model.minivlm.build import PROJECTOR_FILE

    with open(PROJECTOR_FILE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def score_synthbench(adapter, loaded, evals: dict[str, list[dict]], out_dir: str, meta: dict,
                     max_new_tokens: int) -> dict[str, float]:
    """Percent score per subset (greedy answers; predictions cached in ``out_dir``)."""
    meta = {**meta, "projector": projector_digest()}
    row = {}
    for subset, rows in evals.items():
        out = evaluate(adapter, loaded, subset, rows, out_dir, "cpu", max_new_tokens, meta)
        row[subset] = percent(subset, out["scores"])
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="outputs/demo")
    ap.add_argument("--eval_num", type=int, default=None, help="rows per subset (default: all 120)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib_num", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=6)
    ap.add_argument("--only", default=None, help="run only settings whose name contains this")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    adapter = get("llava")
    evals = evaluation_rows(args.eval_num)
    calib_rows = calibration_rows(args.nsamples, args.calib_num)

    summary, timing = {}, {}
    print(f"MiniVLM (DINOv2-S/14 + SmolLM2-135M, trained projector) on SynthBench "
          f"({', '.join(f'{len(r)} rows' for r in evals.values())}), CPU fp32; calibration: {len(calib_rows)} rows "
          f"of the SynthBench calibration files; scores in percent\n")
    print("| setting | " + " | ".join(synthbench.SUBSETS) + " | seconds |")
    print("|---|" + "---|" * (len(synthbench.SUBSETS) + 1))
    for name, flags in SETTINGS:
        if args.only and name != "FP32" and args.only not in name:
            continue
        t0 = time.perf_counter()
        loaded = quantized_minivlm(adapter, flags, calib_rows, args.nsamples, args.calib_num)
        row = score_synthbench(adapter, loaded, evals, os.path.join(args.output_dir, slug(name)),
                               {"setting": name, "flags": flags, "eval_num": args.eval_num}, args.max_new_tokens)
        summary[name], timing[name] = row, time.perf_counter() - t0
        print(f"| {name} | " + " | ".join(f"{row[s]:.1f}" for s in synthbench.SUBSETS) + f" | {timing[name]:.0f} |",
              flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:  # rewritten after each setting
            json.dump(summary, f, indent=2)
        with open(os.path.join(args.output_dir, "timing.json"), "w") as f:
            json.dump(timing, f, indent=2)
    return summary


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


if __name__ == "__main__":
    main()
