"""Compare our FP Qwen-VL-Chat with the checkpoint's own remote code, on a real checkpoint.

Three steps, each in the Python environment that can run it:

    ours       (this project's environment) builds the prompt for an image and a question with our processor,
               writing the image's absolute path into the ``<img>...</img>`` span as the original does, runs
               our model (logits, ViT features, greedy answer) and saves everything to ``--work``
    reference  (an environment where the checkpoint's remote code runs: transformers 4.32, torchvision,
               tiktoken, einops, matplotlib, transformers_stream_generator, accelerate) loads the checkpoint
               with ``trust_remote_code=True``, builds the same prompt with the remote tokenizer's
               ``from_list_format`` and ``make_context`` (what ``model.chat()`` does), and saves its ids, its
               logits (the remote model opens the image named in the span itself), its greedy answer, its
               ViT features for the image and its preprocessed pixels
    compare    prints whether the token ids agree (and where they first differ), how far the pixels, the ViT
               features and the logits are apart, the top-1 agreement and both answers, and writes
               ``compare.json``

``compare`` exits with status 1 when the prompt token ids differ or the top-1 agreement of the logits is below
99%; the pixel, ViT and answer numbers are reported but do not decide (PIL and torchvision resize the same way,
but bf16 ViT features may still differ by rounding, and a greedy answer may fork on a near-tie).

The remote answer is greedy (``do_sample=False``, top_p / top_k at their neutral 1.0 / 50) with the stop words
of ``model.chat()``; the checkpoint's own generation config samples, which would make the answers
incomparable. Newer copies of the remote tokenizer fetch ``SimSun.ttf`` into the current folder when they are
imported unless they find it there: the reference step runs inside ``--work`` (so a fetched copy lands there,
not in the repository) and links the checkpoint folder's ``SimSun.ttf`` there when it has one; offline
without one, put a copy there (any file of that name will do for this check: it is only used to draw boxes).

``scripts/check_qwenvl_fp.sh`` runs all three.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reference step's Python lacks this project
from check_fp_common import (ROOT, add_run_settings, compare_answers, compare_features, compare_ids,  # noqa: E402
                             compare_logits, finish, inside_span, low_cpu_mem, open_compare, ours_settings, parse,
                             parser, read_json, read_pt, reference_settings, versions, write_json, write_settings)

SYSTEM = "You are a helpful assistant."
# the remote forward cuts the span at the first <imgpad> among its first 255 slots: the path needs a pad after it
MAX_PATH_BYTES = 254


def ours(a: argparse.Namespace) -> None:
    """Our model on the image and question; writes ours.pt, prompt.json and settings.json to ``a.work``."""
    sys.path.insert(0, ROOT)
    from PIL import Image

    from model.qwenvl.loading import load

    path = os.path.abspath(a.image)
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise SystemExit(f"{path} is {len(path.encode('utf-8'))} bytes long; the original model reads the image "
                         f"path out of the prompt and takes at most {MAX_PATH_BYTES}: use a shorter path")
    dtype, max_new = ours_settings(a)
    model, proc = load(a.model_path, a.device, dtype)
    tok = proc.tokenizer
    inputs = proc(a.question, [Image.open(path)], image_paths=[path])
    query = proc.query(a.question, 1, [path])
    text, ids = tok.make_context(query, system=proc.system)
    if ids != inputs["input_ids"][0].tolist():
        raise SystemExit("the processor's ids are not make_context's: the saved prompt text would not encode them")
    dev = {k: v.to(a.device) for k, v in inputs.items()}
    with torch.no_grad():
        vit = model.transformer.visual(dev["pixel_values"]).float().cpu()
        logits = model(**dev).logits.float().cpu()
        answer = model.generate(**dev, max_new_tokens=max_new)
    n = inputs["input_ids"].shape[1]
    answer_ids = answer[0, n:].cpu()
    os.makedirs(a.work, exist_ok=True)
    torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "vit": vit,
                "logits": logits, "answer_ids": answer_ids}, os.path.join(a.work, "ours.pt"))
    write_json(a.work, "prompt.json", {"text": text, "query": query, "image": path, "question": a.question,
                                       "answer": proc.decode(answer_ids)})
    write_settings(a, dtype, max_new, stop_ids=[*tok.stop_ids, tok.eod_id], image_start_id=tok.img_start_id)
    print(f"ours: {n} prompt tokens, answer {proc.decode(answer_ids)!r}")


def _remote_helpers(model) -> tuple:
    """``make_context`` and ``decode_tokens`` of the checkpoint's own ``qwen_generation_utils``."""
    mod = sys.modules[type(model).__module__]
    if hasattr(mod, "make_context") and hasattr(mod, "decode_tokens"):
        return mod.make_context, mod.decode_tokens
    utils = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".qwen_generation_utils")
    return utils.make_context, utils.decode_tokens


def reference(a: argparse.Namespace) -> None:
    """The checkpoint's remote code on the same image and question; writes reference.pt to ``a.work``."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = os.path.abspath(a.work)
    model_path = os.path.abspath(a.model_path)
    settings = read_json(work, "settings.json")
    prompt = read_json(work, "prompt.json")
    dtype_name, dtype, max_new = reference_settings(a, settings)
    saved = read_pt(work, "ours.pt")
    os.chdir(work)  # see the module docstring: SimSun.ttf
    font = os.path.join(model_path, "SimSun.ttf")
    if os.path.isfile(font) and not os.path.exists("SimSun.ttf"):
        os.symlink(font, "SimSun.ttf")  # besides the hub cache, the tokenizer looks for it only in the cwd
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    except Exception as e:
        if "SimSun" not in repr(e):
            raise
        raise SystemExit(f"the checkpoint's tokenizer could not fetch SimSun.ttf ({type(e).__name__}); put a copy "
                         f"(any file of that name will do here) into {work} or {model_path}") from e
    # the remote __init__ casts by these flags (and asserts at most one is set), not by torch_dtype alone;
    # all three are given so that a checkpoint config with fp16=true cannot clash with the chosen dtype
    flags = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, "fp32": dtype == torch.float32}
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True, torch_dtype=dtype, **flags,
                                                 **low_cpu_mem()).eval().to(a.device)
    make_context, decode_tokens = _remote_helpers(model)
    path, question = prompt["image"], prompt["question"]
    query = tok.from_list_format([{"image": path}, {"text": question}])
    if query != prompt["query"]:
        print(f"note: the remote from_list_format gives {query!r}, ours {prompt['query']!r} (an older tokenizer "
              "revision writes 'Picture 1:' without the space)")
    gen = copy.deepcopy(model.generation_config)
    raw_text, ids = make_context(tok, query, history=None, system=SYSTEM,
                                 max_window_size=getattr(gen, "max_window_size", None) or 6144, chat_format="chatml")
    input_ids = torch.tensor([ids], device=a.device)
    mask = torch.ones_like(input_ids)
    gen.do_sample, gen.top_p, gen.top_k, gen.num_beams = False, 1.0, 50, 1  # the neutral values: no warnings
    gen.max_new_tokens = max_new
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eod_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.eod_id
    visual = model.transformer.visual
    with torch.no_grad():
        pix = visual.image_transform(Image.open(path).convert("RGB")).unsqueeze(0)
        vit = visual.encode([path]).float().cpu()
        vit_our_pixels = visual(saved["pixel_values"]).float().cpu()
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float().cpu()
        out = model.generate(input_ids, attention_mask=mask, generation_config=gen,
                             stop_words_ids=[[tok.im_end_id], [tok.im_start_id]])
    answer = decode_tokens(out[0], tok, raw_text_len=len(raw_text), context_length=len(ids), chat_format="chatml",
                           verbose=False, errors="replace")
    torch.save({"input_ids": input_ids.cpu(), "pixel_values": pix, "vit": vit, "vit_our_pixels": vit_our_pixels,
                "logits": logits, "answer_ids": out[0, len(ids):].cpu()}, os.path.join(work, "reference.pt"))
    write_json(work, "reference.json", {"text": raw_text, "query": query, "answer": answer, "dtype": dtype_name,
                                        "device": str(a.device), "max_new_tokens": max_new, **versions()})
    print(f"reference: {len(ids)} prompt tokens from the checkpoint's tokenizer, answer {answer!r}")


def compare(a: argparse.Namespace) -> None:
    """Prints and writes compare.json; exits 1 when the token ids differ or top-1 agreement < 99%."""
    o, r, settings, answers = open_compare(a.work)
    result: dict = {}
    problems = []
    first = compare_ids(o, r, result, problems)
    if "pixel_values" in r:
        if o["pixel_values"].shape == r["pixel_values"].shape:
            result["pixels_max_abs"] = float((o["pixel_values"].float() - r["pixel_values"].float()).abs().max())
            print(f"pixels: max abs difference {result['pixels_max_abs']:.3e} (normalized units)")
        else:
            print(f"pixels: shapes differ, ours {tuple(o['pixel_values'].shape)}, "
                  f"reference {tuple(r['pixel_values'].shape)}")
    compare_features(o, r, result, "vit", "ViT features", (("vit", "reference ViT on its own pixels"),
                                                           ("vit_our_pixels", "reference ViT on our pixels")))
    start = settings.get("image_start_id")
    compare_logits(o, r, first, result, problems,
                   lambda ids: None if start is None else ~inside_span(ids, start, start + 1), "spans")
    # the remote generate adds an <|endoftext|> after the stop word; ours stops at the stop word
    compare_answers(o, r, settings, answers, result)
    finish(a.work, result, problems, settings)


def main() -> None:
    p = parser(__doc__, "outputs/check_qwenvl_fp")
    add_run_settings(p)
    a = parse(p)
    {"ours": ours, "reference": reference, "compare": compare}[a.step](a)


if __name__ == "__main__":
    main()
