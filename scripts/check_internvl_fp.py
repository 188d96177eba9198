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

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    saved = torch.load(os.path.join(a.work, "ours.pt"))
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
    o = torch.load(os.path.join(a.work, "ours.pt"))
    r = torch.load(os.path.join(a.work, "reference.pt"))
    same_ids = torch.equal(o["input_ids"], r["input_ids"])
    print(f"token ids: {'identical' if same_ids else 'DIFFERENT'} ({o['input_ids'].shape[1]} ours, "
          f"{r['input_ids'].shape[1]} reference)")
    if not same_ids:
        a_, b_ = o["input_ids"][0].tolist(), r["input_ids"][0].tolist()
        first = next((i for i, (x, y) in enumerate(zip(a_, b_)) if x != y), min(len(a_), len(b_)))
        print(f"  first difference at position {first}: ours {a_[first:first + 8]}, reference {b_[first:first + 8]}")
    lo, lr = o["logits"][0], r["logits"][0]
    rel = float((lo - lr).norm() / lr.norm())
    agree = float((lo.argmax(-1) == lr.argmax(-1)).float().mean())
    print(f"logits: relative difference {rel:.2e}, max abs {float((lo - lr).abs().max()):.3e}, "
          f"top-1 agreement {100 * agree:.1f}% over {lo.shape[0]} positions")
    ok = same_ids and agree > 0.99
    print("MATCH" if ok else "MISMATCH: please report it with this output")
    sys.exit(0 if ok else 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("ours", "reference", "compare"))
    p.add_argument("--model_path", required=False)
    p.add_argument("--image")
    p.add_argument("--question", default="Describe the image in one sentence.")
    p.add_argument("--work", default="outputs/check_internvl_fp")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max_num", type=int, default=6, help="tiles per image")
    p.add_argument("--max_new_tokens", type=int, default=32)
    a = p.parse_args()
    if a.step != "compare" and not a.model_path:
        p.error(f"the {a.step} step needs --model_path")
    if a.step == "ours" and not a.image:
        p.error("the ours step needs --image")
    {"ours": ours, "reference": reference, "compare": compare}[a.step](a)


if __name__ == "__main__":
    main()
