"""Wall time and peak memory of the full W4A8 pipeline on random-weight models of real width.

Each configuration runs in its own process (peak RSS is per process) with a varying number of LLM layers,
then prints a Markdown table. Calibration: 8 GPTQ rows and 16 static rows of the built-in set.

* ``--family qwen2vl`` (default): Qwen2-VL-2B widths (vision 1280 x depth, LLM 1536 hidden / 8960 FFN /
  12 heads / 2 KV heads, vocabulary 151936; ``--widths 7B``: 3584 / 18944 / 28 / 4); 112 px images -> 64 patches.
* ``--family internvl2``: InternViT-300M (1024 wide, 448 px tiles: 1025 tokens per tile, 256 after the pixel
  shuffle) and InternLM2 at InternVL2-2B widths (2048 / 8192 / 16 heads / 8 KV heads, vocabulary 92553;
  ``--widths 8B``: 4096 / 14336 / 32 / 8); the built-in images are square, so one tile each.
* ``--family qwenvl``: Qwen-VL-Chat widths (ViT-bigG 1664 wide / MLP 8192 / 16 heads at 448 px: 1024 tokens; the
  256-query resampler; QWen 4096 / 11008 / 32 heads, vocabulary 151936); ``--widths 7B`` only.

    python bench/pipeline_cost.py [--family qwen2vl|internvl2] [--llm_layers 2,4,8] [--vision_layers 2]
                                  [--vocab N] [--widths 2B|7B|8B] [--device cpu|cuda] [--dtype float32|bfloat16]
    python bench/pipeline_cost.py --family qwenvl --widths 7B [--llm_layers 2]
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


WIDTHS = {  # (LLM hidden, FFN, heads, KV heads, M-RoPE sections), vision 1280 wide in both
    "2B": (1536, 8960, 12, 2, [16, 24, 24]),
    "7B": (3584, 18944, 28, 4, [16, 24, 24]),
}
INTERNVL_WIDTHS = {"2B": (2048, 8192, 16, 8), "8B": (4096, 14336, 32, 8)}  # InternLM2 hidden, FFN, heads, KV heads
QWENVL_WIDTHS = {"7B": (4096, 22016, 32)}  # QWen hidden, config intermediate_size (twice the MLP width), heads
VOCAB = {"qwen2vl": 151936, "internvl2": 92553, "qwenvl": 151936}


def internvl2_model(llm_layers: int, vision_layers: int, vocab: int, device: str, dtype: str, widths: str, folder: str):
    """A random InternVL2 at real widths (our modelling code) with the tiny SentencePiece tokenizer's processor."""
    import torch

    from model.internvl2 import tiny as ivt
    from model.internvl2.config import InternVLConfig
    from model.internvl2.loading import build
    from model.internvl2.processor import InternVLProcessor
    from model.internvl2.tokenizer import SentencePieceTokenizer

    hidden, ffn, heads, kv = INTERNVL_WIDTHS[widths]
    ivt.write_sentencepiece(folder)
    raw = ivt.chat_config(
        ivt.vision_config(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                          num_hidden_layers=vision_layers, image_size=448),
        ivt.internlm2_config(vocab, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                             num_key_value_heads=kv, num_hidden_layers=llm_layers, max_position_embeddings=32768),
        "internlm2-chat", max_dynamic_patch=12)
    cfg = InternVLConfig.from_dict(raw)
    model = build(cfg, device, getattr(torch, dtype))
    ivt.randomize(model, 0)
    processor = InternVLProcessor(SentencePieceTokenizer(folder), cfg)
    model.img_context_token_id = processor.context_id
    return model.eval(), processor


def qwenvl_model(llm_layers: int, vision_layers: int, vocab: int, device: str, dtype: str, widths: str, folder: str):
    """A random Qwen-VL-Chat at real widths (our modelling code) with the tiny tiktoken tokenizer's processor."""
    import torch

    from model.qwenvl import tiny as qt
    from model.qwenvl.config import QWenConfig
    from model.qwenvl.modeling import QWenLMHeadModel
    from model.qwenvl.processor import QWenVLProcessor
    from model.qwenvl.tokenizer import QWenTokenizer, write_tiny_tiktoken
    from model.weights import build_empty

    hidden, inter, heads = QWENVL_WIDTHS[widths]
    ranks = write_tiny_tiktoken(folder, qt.CORPUS)
    raw = qt.qwen_config(vocab, image_start_id=ranks + 214, hidden_size=hidden, intermediate_size=inter,
                         num_attention_heads=heads, kv_channels=hidden // heads, num_hidden_layers=llm_layers,
                         visual={"image_size": 448, "width": 1664, "layers": vision_layers, "heads": 16,
                                 "mlp_ratio": 4.9231})
    cfg = QWenConfig.from_dict(raw)
    model = build_empty(lambda: QWenLMHeadModel(cfg), device, getattr(torch, dtype))
    qt.randomize(model, 0)
    return model.eval(), QWenVLProcessor(QWenTokenizer(folder), cfg)


def one_run(llm_layers: int, vision_layers: int, vocab: int, device: str = "cpu", dtype: str = "float32",
            widths: str = "2B", family: str = "qwen2vl") -> dict:
    import torch

    from evaluation.builtin import builtin_rows
    from fake_quant import pipeline
    from fake_quant.config import QuantConfig
    from model import tiny
    from model.base import Loaded, Sample
    from model.qwen2vl import Qwen2VLAdapter

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    if family == "internvl2":
        import tempfile

        from model.internvl2.adapter import InternVL2Adapter

        model, processor = internvl2_model(llm_layers, vision_layers, vocab, device, dtype, widths, tempfile.mkdtemp())
        adapter = InternVL2Adapter()
    elif family == "qwenvl":
        import tempfile

        from model.qwenvl.adapter import QwenVLAdapter

        model, processor = qwenvl_model(llm_layers, vision_layers, vocab, device, dtype, widths, tempfile.mkdtemp())
        adapter = QwenVLAdapter()
    else:
        hidden, ffn, heads, kv, sections = WIDTHS[widths]
        cfg = tiny.qwen2vl_config(
            text={"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": llm_layers,
                  "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
                  "rope_scaling": {"type": "mrope", "mrope_section": sections}},
            vision={"depth": vision_layers, "embed_dim": 1280, "hidden_size": hidden, "num_heads": 16},
            tie_word_embeddings=True,
        )
        from transformers import Qwen2VLForConditionalGeneration

        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(cfg).to(getattr(torch, dtype)).eval()
        adapter, processor = Qwen2VLAdapter(), tiny.TinyQwenProcessor()
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaded = Loaded(model, processor, f"random-{widths}-widths")
    rows = builtin_rows(16, seed=0)
    batches = [adapter.build_inputs(loaded, Sample([r["image"]], r["question"]), device) for r in rows]
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
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "llm_layers": llm_layers, "vision_layers": vision_layers, "weights_mb": weight_mb,
        "build_s": t1 - t0, "pipeline_s": time.perf_counter() - t1,
        "stages": report.seconds, "rss_after_build_mb": rss_after_build,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm_layers", default="2,4,8")
    ap.add_argument("--vision_layers", type=int, default=2)
    ap.add_argument("--family", default="qwen2vl", choices=sorted(VOCAB))
    ap.add_argument("--vocab", type=int, default=None, help="default: the family's real vocabulary")
    ap.add_argument("--widths", default=None, choices=sorted({*WIDTHS, *INTERNVL_WIDTHS, *QWENVL_WIDTHS}),
                    help="default: 2B (7B for qwenvl)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    vocab = args.vocab or VOCAB[args.family]
    family_widths = {"internvl2": INTERNVL_WIDTHS, "qwenvl": QWENVL_WIDTHS}.get(args.family, WIDTHS)
    args.widths = args.widths or ("7B" if args.family == "qwenvl" else "2B")
    if args.widths not in family_widths:
        ap.error(f"--widths {args.widths} is not one of the {args.family} widths")
    if args._child is not None:
        print(json.dumps(one_run(args._child, args.vision_layers, vocab, args.device, dtype, args.widths,
                                 args.family)))
        return
    import torch

    where = (f"on {torch.cuda.get_device_name()}" if args.device.startswith("cuda")
             else f"on CPU ({torch.get_num_threads()} threads)")
    name = {"internvl2": "InternVL2", "qwenvl": "Qwen-VL-Chat"}.get(args.family, "Qwen2-VL")
    print(f"{name}-{args.widths} widths, random weights, {dtype} {where}; "
          f"{args.vision_layers} vision blocks; W4A8 static, GPTQ act-order + MSE clip, full rotation\n")
    print("| LLM layers | weights MB | pipeline s | s per LLM layer | GPTQ llm s | peak RSS MB | peak RSS - weights MB "
          "| peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(v) for v in args.llm_layers.split(",")):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", str(n),
                              "--vision_layers", str(args.vision_layers), "--vocab", str(vocab),
                              "--widths", args.widths, "--device", args.device, "--dtype", dtype,
                              "--family", args.family],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(out.returncode)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        llm_s = r["stages"].get("weights:llm", 0.0)
        print(f"| {n} | {r['weights_mb']:.0f} | {r['pipeline_s']:.1f} | {llm_s / n:.1f} | {llm_s:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['weights_mb']:.0f} | {r['peak_cuda_mb']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
