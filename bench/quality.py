"""Quantization quality on real weights.

Part 1 (``--part lm``): SmolLM2-135M-Instruct alone (converted by ``make minivlm``), perplexity on
English text that ships with Python (``pydoc_data.topics``: the language reference's topic texts). The
topics are sorted by name; the first half calibrates, the second half is scored -- disjoint text.

Part 2 (``--part vlm``): MiniVLM (DINOv2-S + trained projector + SmolLM2) on SynthBench: the three
subsets' scores and the next-token KL divergence from the FP32 model, teacher-forced on image + question
+ reference answer (all text positions after the image), for RTN / GPTQ, dynamic / static activations and
MSQ / AIFS / RMS on and off. Calibration uses the SynthBench calibration files only.

    python bench/quality.py [--part lm|vlm|peer|all] [--only TEXT]
        part 1: [--lm DIR] [--nsamples 32] [--seqlen 256] [--eval_windows 48]
        part 2: [--eval_num N (default all)] [--kl_rows 40] [--n_boot 1000]
        peer:   [--peer_results peer.jsonl]

Part ``peer``: SmolLM2-135M on a split shared with another tool (``pydoc_data.topics`` sorted, every 5th topic
calibrates, the rest is scored, 512-token windows; see ``peer_split``), with the same settings as the other tool's
configurations, so the two perplexities come from the same windows on the same machine. Give the other tool's
JSONL with ``--peer_results`` to print both in one table; its split fingerprints must match ours.

Caveat: the GGUF source stored this model's linear weights in 4 bits (Q4_1, blocks of 32), so W4 results are
somewhat optimistic; A8 and W8 effects are realistic.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fake_quant import pipeline  # noqa: E402
from fake_quant.config import QuantConfig  # noqa: E402
from model.minivlm.convert import default_cache  # noqa: E402
from model.registry import get as get_adapter  # noqa: E402


def text_windows(tokenizer, seqlen: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    half = len(keys) // 2

    def windows(ks):
        ids = tokenizer("\n\n".join(topics.topics[k] for k in ks), return_tensors="pt")["input_ids"][0]
        return [ids[i:i + seqlen][None] for i in range(0, len(ids) - seqlen + 1, seqlen)]

    return windows(keys[:half]), windows(keys[half:])


PEER_WINDOW, PEER_CALIB = 512, 64


def peer_split(tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """The fixed split shared with other tools (llm-compressor's side of the comparison uses the same one).

    ``pydoc_data.topics`` sorted by name; topic i calibrates when i % 5 == 0 and is scored otherwise. Each set is
    joined with a blank line and tokenized without special tokens; the evaluation stream is cut into every whole
    512-token window, the calibration stream into its first 64 (or fewer) whole windows. Returns the calibration
    and evaluation windows and fingerprints (the first 16 hex digits of SHA-256 of the int64 token ids) that must
    match the other tool's before numbers are compared.
    """
    import hashlib

    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    texts = ["\n\n".join(topics.topics[k] for i, k in enumerate(keys) if (i % 5 == 0) == calib)
             for calib in (True, False)]

    def windows(text: str, limit: int | None) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids) // PEER_WINDOW if limit is None else min(limit, len(ids) // PEER_WINDOW)
        return torch.tensor(ids[: n * PEER_WINDOW], dtype=torch.long).view(n, PEER_WINDOW)

    cal, ev = windows(texts[0], PEER_CALIB), windows(texts[1], None)
    info = {"calib_ids_sha256_16": hashlib.sha256(cal.numpy().tobytes()).hexdigest()[:16],
            "eval_ids_sha256_16": hashlib.sha256(ev.numpy().tobytes()).hexdigest()[:16],
            "calib_windows": int(cal.shape[0]), "eval_windows": int(ev.shape[0])}
    return [w[None] for w in cal], [w[None] for w in ev], info


def config(w_bits=16, a_bits=16, rtn=False, rotate=False, static=False, clip=None, sink=False) -> QuantConfig | None:
    if w_bits == 16 and a_bits == 16 and not rotate:
        return None
    c = QuantConfig(nsamples=1, calib_num=1, msq=False, seed=0, sink_scale=sink)
    c.llm.quantize = w_bits < 16 or a_bits < 16
    c.llm.weight.bits, c.llm.weight.rtn = w_bits, rtn
    c.llm.weight.clip = (not rtn) if clip is None else clip
    c.llm.act.bits, c.llm.act.static = a_bits, static
    c.gptq.act_order = not rtn
    if rotate:
        r = c.rotation
        r.rotate = r.llm = r.online_llm_hadamard = True
    return c


SETTINGS = [
    ("FP32", {}),
    ("W8A8 RTN, dynamic per-token", dict(w_bits=8, a_bits=8, rtn=True)),
    ("W8A8 GPTQ + rotation, static per-tensor", dict(w_bits=8, a_bits=8, rotate=True, static=True)),
    ("W4A16 RTN", dict(w_bits=4, rtn=True)),
    ("W4A16 GPTQ", dict(w_bits=4)),
    ("W4A8 RTN, dynamic per-token", dict(w_bits=4, a_bits=8, rtn=True)),
    ("W4A8 GPTQ, dynamic per-token", dict(w_bits=4, a_bits=8)),
    ("W4A8 GPTQ + rotation, dynamic per-token", dict(w_bits=4, a_bits=8, rotate=True)),
    ("W4A8 GPTQ, static per-tensor", dict(w_bits=4, a_bits=8, static=True)),
    ("W4A8 GPTQ + rotation, static per-tensor", dict(w_bits=4, a_bits=8, rotate=True, static=True)),
]


# the peer comparison: (our setting, config() arguments, the peer tool's configuration of the same row)
PEER_SETTINGS = [
    ("FP32", {}, "fp32"),
    ("W8A8 RTN, A8 per-token dynamic", dict(w_bits=8, a_bits=8, rtn=True), "w8a8_dyn"),
    ("W8A8 RTN, A8 per-tensor static", dict(w_bits=8, a_bits=8, rtn=True, static=True), "w8a8_static"),
    ("W4A16 GPTQ per-channel, act-order", dict(w_bits=4, clip=False), "w4a16_gptq"),
    ("W4A8 GPTQ, A8 per-token dynamic", dict(w_bits=4, a_bits=8, clip=False), "w4a8_gptq_dyn"),
    ("W4A8 rotation + online Hadamard + GPTQ, A8 dynamic", dict(w_bits=4, a_bits=8, rotate=True),
     "spin_r1r2_w4a8_gptq_dyn"),
    ("W4A8 rotation + online Hadamard + GPTQ, A8 static", dict(w_bits=4, a_bits=8, rotate=True, static=True),
     "spin_r1r2_w4a8_gptq_static"),
    ("W4A8 rotation + online Hadamard + GPTQ, A8 static + sink scale",
     dict(w_bits=4, a_bits=8, rotate=True, static=True, sink=True), None),
]


def selected(args, name: str, fp_always: bool = True) -> bool:
    return (not args.only or (fp_always and name == "FP32")
            or any(t.strip() and t.strip() in name for t in args.only.split(",")))


def machine() -> str:
    from fake_quant import cpu_isa

    return (f"{cpu_isa.detect().describe()}; {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
            f"torch {torch.__version__}")


def quantized_lm(adapter, path: str, kw: dict, calib: list[torch.Tensor]):
    """SmolLM2 loaded and run through the pipeline with ``config(**kw)`` on the calibration windows (GPTQ and,
    for static settings, the activation scales). Returns it and the quantize seconds (loading excluded)."""
    loaded = adapter.load(path, "cpu", torch.float32)
    cfg = config(**kw)
    t0 = time.perf_counter()
    if cfg is not None:
        cfg.nsamples = cfg.calib_num = len(calib)
        batches = [{"input_ids": w} for w in calib]
        pipeline.run(cfg, adapter, loaded, batches, batches if cfg.llm.act.static else [])
    return loaded, time.perf_counter() - t0


def part_peer(args) -> None:
    """Our settings on the shared split, next to the peer tool's numbers (``--peer_results``, its JSONL)."""
    adapter = get_adapter("causal_lm")
    calib, evals, info = peer_split(adapter.load(args.lm, "cpu", torch.float32).processor)
    peer = {}
    if args.peer_results:
        with open(args.peer_results) as f:
            for line in f:
                r = json.loads(line)
                if "ppl" not in r:
                    continue
                got = (r.get("split") or {}).get("eval_ids_sha256_16"), (r.get("split") or {}).get("calib_ids_sha256_16")
                if got != (info["eval_ids_sha256_16"], info["calib_ids_sha256_16"]):
                    raise SystemExit(f"{args.peer_results}: {r['config']} was scored on another split {got}; ours is "
                                     f"{(info['eval_ids_sha256_16'], info['calib_ids_sha256_16'])}")
                peer[r["config"]] = r
    where = machine()
    print(f"SmolLM2-135M-Instruct (the MiniVLM LM), fp32; the shared split of pydoc_data.topics: {info['calib_windows']} "
          f"calibration and {info['eval_windows']} evaluation windows of {PEER_WINDOW} tokens (fingerprints eval "
          f"{info['eval_ids_sha256_16']}, calib {info['calib_ids_sha256_16']})\nmachine: {where}\n")
    print("| setting | perplexity | quantize s | peer perplexity | peer quantize s |")
    print("|---|---|---|---|---|")
    rows = []
    for name, kw, peer_name in PEER_SETTINGS:
        if not selected(args, name, fp_always=False):  # no column here is relative to FP32
            continue
        loaded, seconds = quantized_lm(adapter, args.lm, kw, calib)
        ppl = perplexity(loaded.model, evals)
        p = peer.get(peer_name, {})
        rows.append({"setting": name, "ppl": ppl, "quantize_s": seconds, "peer_config": peer_name,
                     "peer_ppl": p.get("ppl"), "peer_quantize_s": p.get("quantize_s")})
        cell = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        print(f"| {name} | {ppl:.3f} | {seconds:.0f} | {cell(p.get('ppl'), '.3f')} | "
              f"{cell(p.get('quantize_s'), '.0f')} |", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "peer_split.json"), "w") as f:
            json.dump({"split": info, "machine": where, "rows": rows}, f, indent=2)
    print()


@torch.no_grad()
def perplexity(model, windows) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["lm", "vlm", "peer", "all"],
                    help="peer: the shared split next to llm-compressor's numbers (not part of 'all')")
    ap.add_argument("--peer_results", default=None,
                    help="part peer: the peer tool's JSONL (--out) to put beside ours; its split must be ours")
    ap.add_argument("--lm", default=os.path.join(default_cache(), "smollm2-135m"))
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval_windows", type=int, default=48)
    ap.add_argument("--eval_num", type=int, default=None,
                    help="part 2: SynthBench rows scored per subset (default: all 120)")
    ap.add_argument("--kl_rows", type=int, default=40, help="part 2: rows per subset for the KL divergence")
    ap.add_argument("--n_boot", type=int, default=1000, help="part 2: bootstrap draws for the intervals")
    ap.add_argument("--output_dir", default="outputs/quality")
    ap.add_argument("--only", default=None,
                    help="run only the settings whose name contains this text (and FP32); several texts: comma-separated")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.lm, "config.json")):
        raise SystemExit(f"{args.lm} has no converted model: run `make minivlm` first")
    logging.disable(logging.INFO)
    torch.set_grad_enabled(False)
    if args.part in ("lm", "all"):
        part_lm(args)
    if args.part in ("vlm", "all"):
        part_vlm(args)
    if args.part == "peer":
        part_peer(args)


def part_lm(args) -> None:
    adapter = get_adapter("causal_lm")
    calib, evals = text_windows(adapter.load(args.lm, "cpu", torch.float32).processor, args.seqlen)
    calib, evals = calib[: args.nsamples], evals[: args.eval_windows]
    print(f"SmolLM2-135M-Instruct, fp32 CPU; calibration: {len(calib)} x {args.seqlen} tokens from the first half of "
          f"pydoc_data.topics; perplexity on {len(evals)} x {args.seqlen} tokens of the second half\n")
    print("| setting | perplexity | vs FP32 | seconds |")
    print("|---|---|---|---|")
    fp = None
    for name, kw in SETTINGS:
        if not selected(args, name):
            continue
        t0 = time.perf_counter()
        loaded, _ = quantized_lm(adapter, args.lm, kw, calib)
        ppl = perplexity(loaded.model, evals)
        fp = fp or ppl
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / fp - 1):+.1f}% | {time.perf_counter() - t0:.0f} |", flush=True)
    print()


# ---------------------------------------------------------------------------------------------
# part 2: MiniVLM on SynthBench
# ---------------------------------------------------------------------------------------------
from exam.demo_minivlm import QUANT, ROT  # noqa: E402  (the demo's flag sets: one definition)

_ROT = ROT
_Q, _GPTQ = QUANT[:4], QUANT[4:]  # which parts are quantized / GPTQ with act-order and MSE clip
_RTN = ["--visual_w_rtn", "--llm_w_rtn"]
_W8 = ["--visual_w_bits", "8", "--llm_w_bits", "8"]
_STATIC = ["--visual_static", "--llm_static"]
_RMS = ["--visual_split", "--llm_split"]
VLM_SETTINGS = [
    ("FP32", []),
    ("W8A8 RTN, dynamic per-token", _Q + _W8 + _RTN),
    ("W8A8 MQuant (static, MSQ + AIFS)", _ROT + _Q + _GPTQ + _W8 + _STATIC + ["--aifs"]),
    ("W4A8 RTN, dynamic per-token", _Q + _RTN),
    ("W4A8 GPTQ + rotation, dynamic per-token", _ROT + _Q + _GPTQ),
    ("W4A8 static, one scale (no MSQ)", _ROT + _Q + _GPTQ + _STATIC + ["--no_msq"]),
    ("W4A8 static, one scale + RMS", _ROT + _Q + _GPTQ + _STATIC + ["--no_msq"] + _RMS),
    ("W4A8 static, MSQ", _ROT + _Q + _GPTQ + _STATIC),
    ("W4A8 static, MSQ + AIFS", _ROT + _Q + _GPTQ + _STATIC + ["--aifs"]),
    ("W4A8 MQuant (static, MSQ + AIFS + RMS)", _ROT + _Q + _GPTQ + _STATIC + ["--aifs"] + _RMS),
    ("W8A8 MQuant + sink scale", _ROT + _Q + _GPTQ + _W8 + _STATIC + ["--aifs", "--sink_scale"]),
    ("W4A8 static, one scale + sink scale", _ROT + _Q + _GPTQ + _STATIC + ["--no_msq", "--sink_scale"]),
    ("W4A8 MQuant + sink scale", _ROT + _Q + _GPTQ + _STATIC + ["--aifs", "--sink_scale"] + _RMS),
    ("W4A8 MQuant + sink scale, W4 in groups of 64", _ROT + _Q + _GPTQ + _STATIC + ["--aifs", "--sink_scale"] + _RMS
     + ["--w_groupsize", "64"]),
]


def part_vlm(args) -> None:
    from exam.demo_minivlm import calibration_rows, evaluation_rows, machine_info, run_table

    evals = evaluation_rows(args.eval_num)
    calib = calibration_rows(32, 64)
    machine = machine_info()
    print(f"MiniVLM (DINOv2-S/14 + SmolLM2-135M, trained projector and LM deltas), fp32 CPU; SynthBench scores in percent on "
          f"{', '.join(f'{len(r)}' for r in evals.values())} rows per subset with 95% bootstrap intervals; "
          f"KL(FP32 || setting) in nats per text token on {args.kl_rows} rows per subset (teacher-forced reference "
          f"answers); calibration: {len(calib)} rows of the SynthBench calibration files (32 for GPTQ, 64 for "
          f"static scales). Machine: {machine['isa']}; {machine['threads']} threads; torch {machine['torch']}\n")
    run_args = argparse.Namespace(nsamples=32, calib_num=64, kl_rows=args.kl_rows, n_boot=args.n_boot,
                                  max_new_tokens=6, eval_num=args.eval_num, output_dir=args.output_dir)
    summary = {"machine": machine, "eval_rows": {s: len(r) for s, r in evals.items()}, "kl_rows": args.kl_rows,
               "settings": {}}
    run_table(VLM_SETTINGS, evals, calib, run_args, summary, "minivlm_quality.json",
              lambda n: selected(args, n))


if __name__ == "__main__":
    main()
