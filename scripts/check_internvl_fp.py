"""Compare our FP InternVL2 with the checkpoint's own remote code, on a real checkpoint.

Three steps, each in the Python environment that can run it:

    ours       (this project's environment) builds the inputs for an image and a question with our
               processor, runs our model, and saves inputs, prompt text and logits to ``--work``
    reference  (an environment where the checkpoint's remote code runs: transformers 4.37-4.45, timm,
               einops) loads the checkpoint with ``trust_remote_code=True``, tokenizes the same prompt text
               with the checkpoint's own tokenizer, runs the same ``pixel_values`` and saves its logits
    compare    prints whether the token ids agree and how far the logits are apart

``scripts/check_internvl_fp.sh`` runs all three.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reference step's Python lacks this project
from check_fp_common import (DTYPES, ROOT, default_device, parse, parser, read_pt, rel_norm, same_ids,  # noqa: E402
                             top1_agreement, verdict)


def ours(a) -> None:
    sys.path.insert(0, ROOT)
    from PIL import Image

    from model.internvl2.loading import load

    dtype = getattr(torch, a.dtype)
    model, proc = load(a.model_path, a.device, dtype, max_num=a.max_num)
    image = Image.open(a.image).convert("RGB")
    inputs = proc(a.question, [image])
    text = proc.prompt(a.question, [inputs["pixel_values"].shape[0]])  # the text those ids encode
    with torch.no_grad():
        logits = model(**{k: v.to(a.device) for k, v in inputs.items()}).logits.float().cpu()
        answer = model.generate(**{k: v.to(a.device) for k, v in inputs.items()}, max_new_tokens=a.max_new_tokens)
    n = inputs["input_ids"].shape[1]
    os.makedirs(a.work, exist_ok=True)
    torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits,
                "answer_ids": answer[0, n:].cpu()}, os.path.join(a.work, "ours.pt"))
    with open(os.path.join(a.work, "prompt.json"), "w") as f:
        json.dump({"text": text, "answer": proc.decode(answer[0, n:])}, f, ensure_ascii=False)
    print(f"ours: {n} prompt tokens, {inputs['pixel_values'].shape[0]} tiles, answer {proc.decode(answer[0, n:])!r}")


def reference(a) -> None:
    from transformers import AutoModel, AutoTokenizer

    dtype = getattr(torch, a.dtype)
    saved = read_pt(a.work, "ours.pt")
    text = json.load(open(os.path.join(a.work, "prompt.json")))["text"]
    tok = AutoTokenizer.from_pretrained(a.model_path, trust_remote_code=True, use_fast=False)
    model = AutoModel.from_pretrained(a.model_path, torch_dtype=dtype, trust_remote_code=True,
                                      low_cpu_mem_usage=True).eval().to(a.device)
    model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = tok(text, return_tensors="pt").input_ids
    pix = saved["pixel_values"].to(a.device, dtype)
    with torch.no_grad():
        out = model(pixel_values=pix, input_ids=saved["input_ids"].to(a.device),
                    attention_mask=torch.ones_like(saved["input_ids"]).to(a.device),
                    image_flags=torch.ones(pix.shape[0], 1, dtype=torch.long, device=a.device))
    torch.save({"input_ids": ids, "logits": out.logits.float().cpu()}, os.path.join(a.work, "reference.pt"))
    print(f"reference: {ids.shape[1]} prompt tokens from the checkpoint's tokenizer")


def compare(a) -> None:
    o, r = read_pt(a.work, "ours.pt"), read_pt(a.work, "reference.pt")
    same, _ = same_ids(o, r, "token ids", "at position")
    lo, lr = o["logits"][0], r["logits"][0]
    rel = rel_norm(lo, lr)
    agree = top1_agreement(lo, lr)
    print(f"logits: relative difference {rel:.2e}, max abs {float((lo - lr).abs().max()):.3e}, "
          f"top-1 agreement {100 * agree:.1f}% over {lo.shape[0]} positions")
    verdict(same and agree > 0.99)


def main() -> None:
    p = parser(__doc__, "outputs/check_internvl_fp")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--max_num", type=int, default=6, help="tiles per image")
    p.add_argument("--max_new_tokens", type=int, default=32)
    a = parse(p)
    {"ours": ours, "reference": reference, "compare": compare}[a.step](a)


if __name__ == "__main__":
    main()
