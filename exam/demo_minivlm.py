"""The main demo: MQuant on MiniVLM (real weights), scored on SynthBench.

Builds MiniVLM (converting the packaged models on first use), then for each setting quantizes a fresh copy,
measures its teacher-forced next-token KL divergence from FP32 (the primary signal: it moves smoothly with the
quantization error, where scores flip on a few unsure answers) and answers all rows of the three SynthBench
evaluation subsets; calibration uses the SynthBench calibration files (another seed). Every quantized setting is
shown with 95% bootstrap intervals: of each score, and of its paired difference from FP32 (the same resampled
rows for both), with the share of answers it gives exactly as FP32 does.

Prints a Markdown table and writes ``outputs/demo/summary.json`` (``summary_calib_seed<S>.json`` for another
calibration seed): ``{"machine": {...}, "calibration": {"seed", "rows"},
"settings": {setting: {"kl": ..., "seconds": ..., "prefill_seconds": ..., "prefill_int8": backend, "scores":
{subset or "mean": {"score", "low", "high", "agreement", "diff", "diff_low", "diff_high"}}}}}``.

Each setting's prefill is also timed on the int8 kernels (``--real_quant``) against FP32 (``--prefill_rows`` prompts per
subset). ``--calib_seed`` picks the calibration rows (0: an even spread; another seed: a random draw), and a
quantized setting's cached answers are kept per seed.

    python exam/demo_minivlm.py [--eval_num N] [--kl_rows N] [--prefill_rows N] [--calib_seed S]
                                [--only WORDS] [--output_dir outputs/demo]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from evaluation import datasets, synthbench  # noqa: E402
from evaluation.eval import evaluate, run_hash  # noqa: E402
from evaluation.kl import (after_visual, forced_greedy, mean_kl, positions_after_visual, teacher_forced_inputs,  # noqa: E402
                           text_logprobs, with_reference)
from evaluation.uncertainty import Uncertainty, bootstrap_table  # noqa: E402
from exam.common import build_parser, config_from_args  # noqa: E402
from fake_quant import pipeline  # noqa: E402
from model.base import Sample  # noqa: E402
from model.registry import get  # noqa: E402

DATA = synthbench.DATA_DIR
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


def calibration_rows(nsamples: int, calib_num: int, seed: int = 0) -> list[dict]:
    """Rows of the three SynthBench calibration files (never the evaluation files). ``seed`` 0: an even spread
    (every k-th row); any other seed: a random draw of as many rows (``random.Random(seed)``), in drawn order --
    the first ``nsamples`` feed GPTQ, the first ``calib_num`` the static scales."""
    rows = [{**r, "calib_file": f"{s}_calib"} for s in synthbench.SUBSETS for r in datasets.load_rows(DATA, f"{s}_calib")]
    n = max(nsamples, calib_num)
    if seed == 0:
        return rows[:: max(1, len(rows) // n)]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def evaluation_rows(eval_num: int | None) -> dict[str, list[dict]]:
    return {s: datasets.load_rows(DATA, s)[:eval_num] for s in synthbench.SUBSETS}


def quantized_minivlm(adapter, base, flags: list[str], calib_rows: list[dict], nsamples: int, calib_num: int):
    """A copy of the FP32 MiniVLM ``base`` (left as it is), quantized with the exam flags ``flags`` (none: FP32),
    and its config (None for FP32)."""
    loaded = dataclasses.replace(base, model=copy.deepcopy(base.model), generation=dict(base.generation))
    cfg = None
    if flags:
        cfg = config_from_args(build_parser("llava").parse_args(
            ["--model_path", "minivlm", "--nsamples", str(nsamples), "--calib_num", str(calib_num), *flags]))
        batches = [adapter.build_inputs(loaded, Sample([datasets.image_of(r)], r["question"]), "cpu")
                   for r in calib_rows]
        pipeline.run(cfg, adapter, loaded, batches[:nsamples], batches[:calib_num])
    return loaded, cfg


def calibration_keys(rows: list[dict]) -> list[str]:
    """``file:index`` of each calibration row (what summary.json records and cached answers are keyed by)."""
    return [f"{r['calib_file']}:{r['index']}" for r in rows]


def prefill_prompts(adapter, loaded, evals: dict[str, list[dict]], per_subset: int) -> list[dict]:
    return [adapter.build_inputs(loaded, Sample([datasets.image_of(r)], adapter.prompt(s, r)), "cpu")
            for s, rows in evals.items() for r in rows[:per_subset]]


def prefill_seconds(model, prompts: list[dict], repeats: int = 3) -> float:
    """Median over ``repeats`` of the summed prefill time (vision tower included, last token's logits) of
    ``prompts``, after one warm-up pass."""
    def once() -> float:
        t0 = time.perf_counter()
        for p in prompts:
            model(**p, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0

    once()
    return sorted(once() for _ in range(repeats))[repeats // 2]


def realized_prefill(cfg, loaded, prompts: list[dict]) -> tuple[float | None, str]:
    """Prefill seconds of ``loaded`` run on the int8 kernels (``--real_quant``), or None and why not."""
    from fake_quant.realize import KernelUnavailable, config_errors

    errs = config_errors(cfg)
    if errs:
        return None, errs[0]
    try:
        report = pipeline.realize(cfg, loaded)
    except (KernelUnavailable, ValueError) as e:
        return None, str(e)
    return prefill_seconds(loaded.model, prompts), report.backend


def projector_digest() -> str:
    """Identifies the trained weights (projector and LM deltas), so cached predictions of others are never reused."""
    from model.minivlm.build import TRAINED_FILE

    with open(TRAINED_FILE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def answer_synthbench(adapter, loaded, evals: dict[str, list[dict]], out_dir: str, meta: dict,
                      max_new_tokens: int, kl_rows: int = 0) -> tuple[dict[str, list[str]], list[torch.Tensor]]:
    """Greedy answers per subset (cached in ``<out_dir>_<hash of the run>``: a rerun of the same setting on the same
    model resumes; another model or decoding starts a folder of its own) and the teacher-forced
    log-probabilities of the first ``kl_rows`` rows of each subset (see :mod:`evaluation.kl`).

    Each row is answered by :func:`evaluation.kl.forced_greedy`: one forward over the prompt and the reference
    answer gives the KL's log-probabilities and, wherever the model agrees with the reference, its greedy answer,
    so the KL costs nothing beyond the answers and a right answer costs one forward. Rows whose answer was cached
    by an earlier run get their log-probabilities from a forward of their own."""
    meta = {**meta, "projector": projector_digest(), "decoding": "greedy, read off a teacher-forced forward"}
    out_dir = f"{out_dir}_{run_hash(meta)[:8]}"
    gen_cfg = loaded.model.generation_config
    eos = gen_cfg.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if adapter.decoding(loaded) or not eos:
        raise ValueError("the demo decodes greedily until the end-of-sequence token: this model's evaluation "
                         f"decoding {adapter.decoding(loaded)} / eos {gen_cfg.eos_token_id} is not that")
    lps: dict[tuple[str, int], torch.Tensor] = {}
    preds = {}
    for subset, rows in evals.items():
        kl_index = {str(r["index"]) for r in rows[:kl_rows]}

        def answer(inputs: dict, row: dict) -> list[int]:
            forced = with_reference(loaded, inputs, row)
            kl = str(row["index"]) in kl_index
            keep = positions_after_visual(adapter, loaded, forced) if kl else 0
            new, logits = forced_greedy(loaded.model, forced, inputs["input_ids"].shape[1], max_new_tokens, eos, keep)
            if kl:
                lps[subset, str(row["index"])] = after_visual(adapter, loaded, forced, logits)
            return new

        preds[subset] = evaluate(adapter, loaded, subset, rows, out_dir, "cpu", max_new_tokens, meta,
                                 answer=answer)["predictions"]
    ordered = []
    for subset, rows in evals.items():
        for r in rows[:kl_rows]:
            key = subset, str(r["index"])
            if key not in lps:  # answered by an earlier run
                lps[key] = text_logprobs(adapter, loaded, teacher_forced_inputs(adapter, loaded, {subset: [r]}, 1))[0]
            ordered.append(lps[key])
    return preds, ordered


def machine_info() -> dict:
    """What a score depends on besides the code: the exam scripts' machine record (CPU, cores, ISA flags) plus the
    int8 / bf16 paths torch takes, the thread count and the torch build."""
    import platform

    from exam.common import machine
    from fake_quant import cpu_isa

    return {**machine(), "isa": cpu_isa.detect().describe(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "torch_build": cpu_isa.torch_build(), "python": platform.python_version()}


def cell(u: Uncertainty) -> str:
    return f"{u.score:.1f} [{u.low:.1f}, {u.high:.1f}]"


def diff_cell(u: Uncertainty) -> str:
    if u.diff_low is None:
        return ""
    mark = "" if u.distinguishable() else " ~"
    return f"{u.diff:+.1f} [{u.diff_low:+.1f}, {u.diff_high:+.1f}]{mark}"


def header(subsets) -> str:
    cols = ["setting", "KL", *subsets, "mean", "mean - FP32", "same answer %", "prefill ms", "x vs FP32", "seconds"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def prefill_cells(prefill: float | None, ref: float | None) -> str:
    if prefill is None:
        return " | "
    speed = "" if ref is None or prefill == ref else f"{ref / prefill:.2f}"
    return f"{prefill * 1e3:.0f} | {speed}"


def table_row(name: str, kl: float, unc: dict[str, Uncertainty], seconds: float, prefill: float | None = None,
              ref_prefill: float | None = None) -> str:
    subsets = [k for k in unc if k != "mean"]
    m = unc["mean"]
    agree = "" if m.agreement is None else f"{m.agreement:.1f}"
    return (f"| {name} | {kl:.4f} | " + " | ".join(cell(unc[s]) for s in subsets) +
            f" | {cell(m)} | {diff_cell(m)} | {agree} | {prefill_cells(prefill, ref_prefill)} | {seconds:.0f} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", default="outputs/demo")
    ap.add_argument("--eval_num", type=int, default=None, help="rows per subset (default: all 120)")
    ap.add_argument("--kl_rows", type=int, default=40, help="rows per subset for the KL divergence (default 40)")
    ap.add_argument("--n_boot", type=int, default=1000, help="bootstrap draws for the intervals (default 1000)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib_num", type=int, default=64)
    ap.add_argument("--calib_seed", type=int, default=0,
                    help="which calibration rows: 0 (default) an even spread over the calibration files, another "
                         "value a random draw of that seed (the spread of scores across seeds: docs/results.md)")
    ap.add_argument("--max_new_tokens", type=int, default=6)
    ap.add_argument("--only", default=None, help="run only settings whose name contains this (FP32 always runs)")
    ap.add_argument("--prefill_rows", type=int, default=2,
                    help="rows per subset whose prefill is timed, FP32 against each setting run on the int8 kernels "
                         "(--real_quant; 0: no timing)")
    args = ap.parse_args(argv)
    if args.prefill_rows < 0:
        ap.error(f"--prefill_rows must be 0 or more, got {args.prefill_rows}")
    if args.eval_num is not None and args.eval_num < 1:
        ap.error(f"--eval_num must be at least 1, got {args.eval_num}")
    if args.kl_rows < 1:
        ap.error(f"--kl_rows must be at least 1, got {args.kl_rows}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    evals = evaluation_rows(args.eval_num)
    if args.calib_seed < 0:
        ap.error(f"--calib_seed must be 0 or more, got {args.calib_seed}")
    calib_rows = calibration_rows(args.nsamples, args.calib_num, args.calib_seed)
    machine = machine_info()

    summary = {"machine": machine, "eval_rows": {s: len(r) for s, r in evals.items()}, "kl_rows": args.kl_rows,
               "calibration": {"seed": args.calib_seed, "rows": calibration_keys(calib_rows)},
               "settings": {}}
    print(f"MiniVLM (DINOv2-S/14 + SmolLM2-135M, trained projector and LM deltas) on SynthBench "
          f"({', '.join(f'{len(r)} rows' for r in evals.values())}), CPU fp32; calibration: {len(calib_rows)} rows "
          f"of the SynthBench calibration files (--calib_seed {args.calib_seed}). Machine: {machine['isa']}; {machine['threads']} threads; "
          f"torch {machine['torch']}.\n"
          f"KL: KL(FP32 || setting), nats per text token, teacher-forced on {args.kl_rows} rows per subset. Scores in "
          f"percent with 95% bootstrap intervals; 'mean - FP32' is the paired difference (same resampled rows), "
          f"marked ~ where its interval contains 0 (not distinguishable from FP32 on these rows). Prefill: "
          f"{args.prefill_rows} prompt(s) per subset, the whole prefill (vision tower included), FP32 against the "
          f"setting run on the int8 kernels (--real_quant, non-GEMM parts in fp32), median of 3.\n")
    name = "summary.json" if args.calib_seed == 0 else f"summary_calib_seed{args.calib_seed}.json"
    return run_table(SETTINGS, evals, calib_rows, args, summary, name,
                     (lambda n: args.only in n) if args.only else None)


def run_table(settings, evals: dict[str, list[dict]], calib_rows: list[dict], args, summary: dict,
              summary_name: str, selected=None) -> dict:
    """Quantize, measure and score every setting of ``settings`` (the first must be FP32: the reference), print
    one table row each and rewrite ``<output_dir>/<summary_name>`` after each. ``args`` carries nsamples,
    calib_num, kl_rows, n_boot, max_new_tokens, eval_num and output_dir; ``selected(name)`` filters settings."""
    if settings[0][1]:
        raise ValueError("the first setting must be FP32 (no flags): it is the reference")
    adapter = get("llava")
    print(header(synthbench.SUBSETS))
    ref_lp = ref_preds = ref_prefill = None
    base = adapter.load("minivlm", "cpu", torch.float32)  # every setting starts from a copy of it
    prefill_rows = getattr(args, "prefill_rows", 0)
    for name, flags in settings:
        if ref_lp is not None and selected is not None and not selected(name):
            continue
        t0 = time.perf_counter()
        loaded, cfg = quantized_minivlm(adapter, base, flags, calib_rows, args.nsamples, args.calib_num)
        meta = {"setting": name, "flags": flags, "eval_num": args.eval_num}
        if flags:  # cached answers of a quantized setting belong to its calibration rows
            meta["calibration"] = {"nsamples": args.nsamples, "calib_num": args.calib_num,
                                   "rows": calibration_keys(calib_rows)}
        seed = getattr(args, "calib_seed", 0)
        folder = slug(name) + (f"_calib_seed{seed}" if flags and seed else "")  # FP32's answers serve every seed
        preds, lp = answer_synthbench(adapter, loaded, evals, os.path.join(args.output_dir, folder), meta,
                                      args.max_new_tokens, args.kl_rows)
        reference = ref_lp is None
        if reference:
            ref_lp, ref_preds = lp, preds
        kl = mean_kl(ref_lp, lp)
        unc = bootstrap_table({s: (evals[s], preds[s], None if reference else ref_preds[s]) for s in evals},
                              n_boot=args.n_boot)
        seconds = time.perf_counter() - t0
        prefill, backend = None, None
        if prefill_rows:  # last: realization replaces the fake-quant layers
            prompts = prefill_prompts(adapter, loaded, evals, prefill_rows)
            if reference:
                prefill = ref_prefill = prefill_seconds(loaded.model, prompts)
            else:
                prefill, backend = realized_prefill(cfg, loaded, prompts)
        summary["settings"][name] = {"kl": kl, "seconds": seconds, "flags": flags,
                                     "scores": {k: u.as_dict() for k, u in unc.items()},
                                     "prefill_seconds": prefill, "prefill_prompts": prefill_rows * len(evals),
                                     "prefill_int8": backend}
        print(table_row(name, kl, unc, seconds, prefill, ref_prefill), flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, summary_name), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


if __name__ == "__main__":
    main()
