"""Wall time and peak memory of the full W4A8 pipeline on random-weight Qwen2-VL models of real width.

Each configuration runs in its own process (peak RSS is per process) with the 2B widths (vision
1280 x depth, LLM 1536 hidden / 8960 FFN / 12 heads / 2 KV heads, vocabulary 151936) and a varying
number of LLM layers, then prints a Markdown table. Calibration: 8 GPTQ rows and 16 static rows of
the built-in set (112 px images -> 64 patches).

    python bench/pipeline_cost.py [--llm_layers 2,4,8] [--vision_layers 2] [--vocab 151936]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_run(llm_layers: int, vision_layers: int, vocab: int) -> dict:
    import torch

    from evaluation.builtin import builtin_rows
    from fake_quant import pipeline
    from fake_quant.config import QuantConfig
    from model import tiny
    from model.base import Loaded, Sample
    from model.qwen2vl import Qwen2VLAdapter

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    cfg = tiny.qwen2vl_config(
        text={"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": llm_layers,
              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": vocab,
              "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        vision={"depth": vision_layers, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16},
        tie_word_embeddings=True,
    )
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).float().eval()
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    adapter = Qwen2VLAdapter()
    loaded = Loaded(model, tiny.TinyQwenProcessor(), "random-2B-widths")
    rows = builtin_rows(16, seed=0)
    batches = [adapter.build_inputs(loaded, Sample([r["image"]], r["question"]), "cpu") for r in rows]
    q = QuantConfig(nsamples=8, calib_num=16, seed=0)
    r = q.rotation
    r.rotate = r.visual = r.llm = r.online_visual_hadamard = r.online_llm_hadamard = True
    for part in q.parts():
        part.quantize = True
        part.weight.bits, part.weight.clip, part.act.bits, part.act.static = 4, True, 8, True
    q.connector = True
    q.gptq.act_order = True
    t1 = time.perf_counter()
    report = pipeline.run(q, adapter, loaded, batches[:8], batches)
    return {
        "llm_layers": llm_layers, "vision_layers": vision_layers, "weights_mb": weight_mb,
        "build_s": t1 - t0, "pipeline_s": time.perf_counter() - t1,
        "stages": report.seconds, "rss_after_build_mb": rss_after_build,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm_layers", default="2,4,8")
    ap.add_argument("--vision_layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child is not None:
        print(json.dumps(one_run(args._child, args.vision_layers, args.vocab)))
        return
    import torch

    print(f"Qwen2-VL-2B widths, random weights, fp32 on CPU ({torch.get_num_threads()} threads); "
          f"{args.vision_layers} vision blocks; W4A8 static, GPTQ act-order + MSE clip, full rotation\n")
    print("| LLM layers | weights MB | pipeline s | s per LLM layer | GPTQ llm s | peak RSS MB | peak RSS - weights MB |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(v) for v in args.llm_layers.split(",")):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(n),
                              "--vision_layers", str(args.vision_layers), "--vocab", str(args.vocab)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(out.returncode)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        llm_s = r["stages"].get("weights:llm", 0.0)
        print(f"| {n} | {r['weights_mb']:.0f} | {r['pipeline_s']:.1f} | {llm_s / n:.1f} | {llm_s:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['weights_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
