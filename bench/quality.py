"""Quantization quality on real weights.

Part 1 (this file's default): SmolLM2-135M-Instruct alone (converted by ``make minivlm``), perplexity on
English text that ships with Python (``pydoc_data.topics``: the language reference's topic texts). The
topics are sorted by name; the first half calibrates, the second half is scored -- disjoint text.

    python bench/quality.py [--lm DIR] [--nsamples 32] [--seqlen 256] [--eval_windows 48]

Caveat: the GGUF source stored this model's linear weights in 4 bits (Q4_1, blocks of 32), so W4 results are
somewhat optimistic; A8 and W8 effects are realistic.
"""
from __future__ import annotations

import argparse
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


def config(w_bits=16, a_bits=16, rtn=False, rotate=False, static=False) -> QuantConfig | None:
    if w_bits == 16 and a_bits == 16 and not rotate:
        return None
    c = QuantConfig(nsamples=1, calib_num=1, msq=False, seed=0)
    c.llm.quantize = w_bits < 16 or a_bits < 16
    c.llm.weight.bits, c.llm.weight.rtn, c.llm.weight.clip = w_bits, rtn, not rtn
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
    ap.add_argument("--lm", default=os.path.join(default_cache(), "smollm2-135m"))
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval_windows", type=int, default=48)
    ap.add_argument("--only", default=None, help="run only the settings whose name contains this text (and FP32)")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.lm, "config.json")):
        raise SystemExit(f"{args.lm} has no converted model: run `make minivlm` first")
    logging.disable(logging.INFO)
    torch.set_grad_enabled(False)
    adapter = get_adapter("causal_lm")
    calib, evals = text_windows(adapter.load(args.lm, "cpu", torch.float32).processor, args.seqlen)
    calib, evals = calib[: args.nsamples], evals[: args.eval_windows]
    print(f"SmolLM2-135M-Instruct, fp32 CPU; calibration: {len(calib)} x {args.seqlen} tokens from the first half of "
          f"pydoc_data.topics; perplexity on {len(evals)} x {args.seqlen} tokens of the second half\n")
    print("| setting | perplexity | vs FP32 | seconds |")
    print("|---|---|---|---|")
    fp = None
    for name, kw in SETTINGS:
        if args.only and name != "FP32" and args.only not in name:
            continue
        loaded = adapter.load(args.lm, "cpu", torch.float32)
        t0 = time.perf_counter()
        cfg = config(**kw)
        if cfg is not None:
            cfg.nsamples = cfg.calib_num = len(calib)
            batches = [{"input_ids": w} for w in calib]
            pipeline.run(cfg, adapter, loaded, batches, batches if cfg.llm.act.static else [])
        ppl = perplexity(loaded.model, evals)
        fp = fp or ppl
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / fp - 1):+.1f}% | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
