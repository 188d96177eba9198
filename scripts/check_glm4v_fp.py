"""Compare our FP GLM-4V with the checkpoint's own remote code, on a real checkpoint.

Three steps, each in the Python environment that can run it:

    ours       (this project's environment) builds the prompt for an image and a question with our processor,
               runs our model (logits over the merged sequence, the tower's output vectors, a greedy answer) and
               saves inputs and outputs to ``--work``
    reference  (an environment where the checkpoint's remote code runs: transformers 4.44-4.48 with torchvision,
               tiktoken and accelerate) loads the checkpoint with ``trust_remote_code=True``, builds the same user
               turn with the remote tokenizer's ``apply_chat_template`` (its ids and its own preprocessed image),
               runs the remote model on *our* pixels (so that the logits compare the models, not the resizing),
               the remote tower on both pixel sets, and a greedy answer; saves them to ``--work``
    compare    prints whether the prompt ids agree (and where they first differ), how far the pixels, the tower
               vectors and the logits are apart, the top-1 agreement and both answers, and writes ``compare.json``

``compare`` exits with status 1 when the prompt ids differ or the top-1 agreement of the logits is below 99%; the
pixel, tower and answer numbers are reported but do not decide (bf16 rounding differs between the two codes, and
a greedy answer may fork on a near-tie). The remote answer is greedy (``do_sample=False``), as VLMEvalKit's GLM4v.

``scripts/check_glm4v_fp.sh`` runs all three.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reference step's Python lacks this project
from check_fp_common import (DTYPES, MIN_AGREEMENT, ROOT, answers, default_device, ours_settings,  # noqa: E402
                             parser, read_json, read_pt, reference_settings, rel_max, rel_norm, reply, same_ids,
                             top1_agreement, verdict, versions, write_json, write_settings)


def ours(a: argparse.Namespace) -> None:
    """Our model on the image and question; writes ours.pt, prompt.json and settings.json to ``a.work``."""
    sys.path.insert(0, ROOT)
    from PIL import Image

    from model.glm4v.loading import load

    dtype, max_new = ours_settings(a)
    model, proc = load(a.model_path, a.device, dtype)
    path = os.path.abspath(a.image)
    inputs = proc(a.question, [Image.open(path)])
    dev = {k: (v.to(a.device, dtype) if k == "pixel_values" else v.to(a.device)) for k, v in inputs.items()}
    with torch.no_grad():
        vision = model.transformer.vision(dev["pixel_values"]).float().cpu()
        logits = model(**dev).logits.float().cpu()
        answer = model.generate(**dev, max_new_tokens=max_new)
    n = inputs["input_ids"].shape[1]
    answer_ids = answer[0, n:].cpu()
    os.makedirs(a.work, exist_ok=True)
    torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "vision": vision,
                "logits": logits, "answer_ids": answer_ids}, os.path.join(a.work, "ours.pt"))
    tok = proc.tokenizer
    write_json(a.work, "prompt.json", {"image": path, "question": a.question, "answer": proc.decode(answer_ids)})
    write_settings(a, dtype, max_new, stop_ids=list(tok.stop_ids))
    print(f"ours: {n} prompt ids, {logits.shape[1]} positions after the image splice, answer "
          f"{proc.decode(answer_ids)!r}")


def reference(a: argparse.Namespace) -> None:
    """The checkpoint's remote code on the same image and question; writes reference.pt to ``a.work``."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = os.path.abspath(a.work)
    settings = read_json(work, "settings.json")
    prompt = read_json(work, "prompt.json")
    model_path = os.path.abspath(a.model_path or settings["model_path"])
    dtype_name, dtype, max_new = reference_settings(a, settings)
    device = a.device or settings["device"]
    saved = read_pt(work, "ours.pt")
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype, trust_remote_code=True,
                                                 low_cpu_mem_usage=True).eval().to(device)
    image = Image.open(prompt["image"]).convert("RGB")
    inputs = tok.apply_chat_template([{"role": "user", "image": image, "content": prompt["question"]}],
                                     add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True)
    inputs = inputs.to(device)
    ours_pix = saved["pixel_values"].to(device, dtype)
    with torch.no_grad():
        vision = model.transformer.vision(inputs["images"].to(dtype)).float().cpu()
        vision_our_pixels = model.transformer.vision(ours_pix).float().cpu()
        logits = model(input_ids=inputs["input_ids"], images=ours_pix, attention_mask=inputs["attention_mask"],
                       position_ids=inputs.get("position_ids"), use_cache=False).logits.float().cpu()
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=settings["stop_ids"])
    n = inputs["input_ids"].shape[1]
    torch.save({"input_ids": inputs["input_ids"].cpu(), "pixel_values": inputs["images"].float().cpu(),
                "vision": vision, "vision_our_pixels": vision_our_pixels, "logits": logits,
                "answer_ids": out[0, n:].cpu()}, os.path.join(work, "reference.pt"))
    answer = tok.decode(out[0, n:])
    write_json(work, "reference.json", {"answer": answer, "dtype": dtype_name, "device": str(device), **versions()})
    print(f"reference: {n} prompt ids from the checkpoint's tokenizer, answer {answer!r}")


def compare(a: argparse.Namespace) -> None:
    """Prints and writes compare.json; exits 1 when the prompt ids differ or top-1 agreement < 99%."""
    o, r = read_pt(a.work, "ours.pt"), read_pt(a.work, "reference.pt")
    result: dict = {}
    same, first = same_ids(o, r, "prompt ids", "at")
    result["prompt_ids_identical"] = same
    if not same:
        result["first_difference"] = first
    if "pixel_values" in r and r["pixel_values"].shape == o["pixel_values"].shape:
        result["pixels_max_abs"] = float((o["pixel_values"].float() - r["pixel_values"]).abs().max())
        print(f"pixels: max abs difference {result['pixels_max_abs']:.3e} (our resize vs the remote tokenizer's)")
    if "vision_our_pixels" in r:
        result["vision_rel_max"] = rel_max(o["vision"], r["vision_our_pixels"])
        print(f"tower vectors (same pixels): relative max difference {result['vision_rel_max']:.2e}")
    lo, lr = o["logits"][0], r["logits"][0]
    if lo.shape != lr.shape:
        result.update(match=False, reason=f"logit shapes differ: {tuple(lo.shape)} vs {tuple(lr.shape)}")
        print(f"MISMATCH: {result['reason']}")
        write_json(a.work, "compare.json", result)
        sys.exit(1)
    agree = top1_agreement(lo, lr)
    result.update(logits_rel_norm=rel_norm(lo, lr), logits_rel_max=rel_max(lo, lr),
                  top1_agreement=agree, positions=lo.shape[0])
    print(f"logits: relative difference {result['logits_rel_norm']:.2e} (norm), {result['logits_rel_max']:.2e} "
          f"(max), top-1 agreement {100 * agree:.1f}% over {lo.shape[0]} positions")
    stops = set(read_json(a.work, "settings.json").get("stop_ids", []))
    same_answer = reply(o["answer_ids"], stops) == reply(r["answer_ids"], stops)
    result["answers_identical"] = same_answer
    both = answers(a.work)
    result["answers"] = both
    print(f"greedy answers: {'identical' if same_answer else 'different'}: {both}")
    ok = same and agree >= MIN_AGREEMENT
    result["match"] = ok
    write_json(a.work, "compare.json", result)
    verdict(ok)


def main() -> None:
    p = parser(__doc__, "outputs/check_glm4v_fp",
               "the checkpoint folder (the reference step defaults to the ours step's)")
    p.add_argument("--device", default=None, help="default: cuda when available (reference: the ours step's)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default bfloat16 (reference: the ours step's)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="greedy answer length (default 32)")
    a = p.parse_args()
    if a.step == "ours":
        if not a.model_path or not a.image:
            p.error("the ours step needs --model_path and --image")
        a.device = a.device or default_device()
    {"ours": ours, "reference": reference, "compare": compare}[a.step](a)


if __name__ == "__main__":
    main()
