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
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_AGREEMENT = 0.99


def _load(work: str, name: str) -> dict:
    return torch.load(os.path.join(work, name), map_location="cpu")


def _read_json(work: str, name: str) -> dict:
    with open(os.path.join(work, name), encoding="utf-8") as f:
        return json.load(f)


def _write_json(work: str, name: str, data: dict) -> None:
    with open(os.path.join(work, name), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)


def ours(a: argparse.Namespace) -> None:
    """Our model on the image and question; writes ours.pt, prompt.json and settings.json to ``a.work``."""
    sys.path.insert(0, ROOT)
    from PIL import Image

    from model.glm4v.loading import load

    dtype = getattr(torch, a.dtype or "bfloat16")
    max_new = a.max_new_tokens or 32
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
    _write_json(a.work, "prompt.json", {"image": path, "question": a.question, "answer": proc.decode(answer_ids)})
    # the reference step runs without this project: it takes its settings and the stop ids from here
    _write_json(a.work, "settings.json", {"model_path": os.path.abspath(a.model_path),
                                          "dtype": str(dtype).removeprefix("torch."), "device": str(a.device),
                                          "max_new_tokens": max_new, "stop_ids": list(tok.stop_ids),
                                          "torch": torch.__version__})
    print(f"ours: {n} prompt ids, {logits.shape[1]} positions after the image splice, answer "
          f"{proc.decode(answer_ids)!r}")


def reference(a: argparse.Namespace) -> None:
    """The checkpoint's remote code on the same image and question; writes reference.pt to ``a.work``."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = os.path.abspath(a.work)
    settings = _read_json(work, "settings.json")
    prompt = _read_json(work, "prompt.json")
    model_path = os.path.abspath(a.model_path or settings["model_path"])
    dtype_name = a.dtype or settings["dtype"]
    dtype = getattr(torch, dtype_name)
    device = a.device or settings["device"]
    max_new = a.max_new_tokens or settings["max_new_tokens"]
    saved = _load(work, "ours.pt")
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
    _write_json(work, "reference.json", {"answer": answer, "dtype": dtype_name, "device": str(device),
                                         "transformers": __import__("transformers").__version__,
                                         "torch": torch.__version__})
    print(f"reference: {n} prompt ids from the checkpoint's tokenizer, answer {answer!r}")


def rel_max(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|."""
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30))


def _reply(ids: torch.Tensor, stops: set[int]) -> list[int]:
    ids = ids.tolist()
    return ids[:next((k for k, t in enumerate(ids) if t in stops), len(ids))]


def compare(a: argparse.Namespace) -> None:
    """Prints and writes compare.json; exits 1 when the prompt ids differ or top-1 agreement < 99%."""
    o, r = _load(a.work, "ours.pt"), _load(a.work, "reference.pt")
    result: dict = {}
    same_ids = torch.equal(o["input_ids"], r["input_ids"])
    result["prompt_ids_identical"] = same_ids
    print(f"prompt ids: {'identical' if same_ids else 'DIFFERENT'} ({o['input_ids'].shape[1]} ours, "
          f"{r['input_ids'].shape[1]} reference)")
    if not same_ids:
        x, y = o["input_ids"][0].tolist(), r["input_ids"][0].tolist()
        first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        result["first_difference"] = first
        print(f"  first difference at {first}: ours {x[first:first + 8]}, reference {y[first:first + 8]}")
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
        _write_json(a.work, "compare.json", result)
        sys.exit(1)
    agree = float((lo.argmax(-1) == lr.argmax(-1)).float().mean())
    result.update(logits_rel_norm=float((lo - lr).norm() / lr.norm()), logits_rel_max=rel_max(lo, lr),
                  top1_agreement=agree, positions=lo.shape[0])
    print(f"logits: relative difference {result['logits_rel_norm']:.2e} (norm), {result['logits_rel_max']:.2e} "
          f"(max), top-1 agreement {100 * agree:.1f}% over {lo.shape[0]} positions")
    stops = set(_read_json(a.work, "settings.json").get("stop_ids", []))
    same_answer = _reply(o["answer_ids"], stops) == _reply(r["answer_ids"], stops)
    result["answers_identical"] = same_answer
    answers = {"ours": _read_json(a.work, "prompt.json").get("answer")}
    if os.path.exists(os.path.join(a.work, "reference.json")):
        answers["reference"] = _read_json(a.work, "reference.json").get("answer")
    result["answers"] = answers
    print(f"greedy answers: {'identical' if same_answer else 'different'}: {answers}")
    ok = same_ids and agree >= MIN_AGREEMENT
    result["match"] = ok
    _write_json(a.work, "compare.json", result)
    print("MATCH" if ok else "MISMATCH: please report it with this output")
    sys.exit(0 if ok else 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("ours", "reference", "compare"))
    p.add_argument("--model_path", help="the checkpoint folder (the reference step defaults to the ours step's)")
    p.add_argument("--image")
    p.add_argument("--question", default="Describe the image in one sentence.")
    p.add_argument("--work", default="outputs/check_glm4v_fp")
    p.add_argument("--device", default=None, help="default: cuda when available (reference: the ours step's)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 (reference: the ours step's)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="greedy answer length (default 32)")
    a = p.parse_args()
    if a.step == "ours":
        if not a.model_path or not a.image:
            p.error("the ours step needs --model_path and --image")
        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    {"ours": ours, "reference": reference, "compare": compare}[a.step](a)


if __name__ == "__main__":
    main()
