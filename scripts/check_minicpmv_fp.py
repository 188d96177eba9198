"""Compare our FP MiniCPM-V 2.6 with the checkpoint's own remote code, on a real checkpoint.

Three steps, each in the Python environment that can run it:

    ours       (this project's environment) slices the image and builds the prompt for a question with our
               processor, runs our model (the resampler's vision features, the logits of the full forward and
               the answer: beam search with 3 beams and repetition penalty 1.2, as ``chat(sampling=False)``
               decodes; ``--greedy`` for one beam without a penalty) and saves everything to ``--work``
    reference  (an environment where the checkpoint's remote code runs: transformers 4.40-4.45 with torch,
               torchvision, numpy < 2, Pillow and optionally accelerate) loads the checkpoint with
               ``trust_remote_code=True`` and builds the inputs with the checkpoint's own processor from the
               same image and question, laid out as
               ``chat()`` lays out ``msgs=[{"role": "user", "content": [image, question]}]``; it saves its ids,
               slices, ``tgt_sizes``, its vision features (``get_vllm_embedding``, on its own slices and on ours),
               the logits of its ``forward`` and the answer of ``generate`` / ``chat()`` with the same settings
    compare    prints whether the token ids agree (and where they first differ), whether every slice has the
               same (rows, cols), how far the pixels, the vision features and the logits are apart, the top-1
               agreement (over all positions and outside the image slots) and both answers, and writes
               ``compare.json``

``compare`` exits with status 1 when the prompt token ids differ or the top-1 agreement of the logits is below
99%; pixels, features and answers are reported but do not decide (bf16 rounding moves features, and a beam
search may fork on a near-tie). Slicing and the placeholder text are checked through the ids and ``tgt_sizes``:
the reference builds both with its own processor, not from our prompt.

What the reference step takes from the remote code, read in the August-October 2024 revision of the HF files
(``modeling_minicpmv.py``, ``processing_minicpmv.py``, ``image_processing_minicpmv.py``); a later revision
that renames these breaks the step rather than the comparison:

* ``chat()`` builds the prompt inline; the step repeats it: the content items joined by "\\n" with the image
  as ``(<image>./</image>)``, the tokenizer's ``apply_chat_template(add_generation_prompt=True)``, then
  ``processor([prompt], [[image]], max_slice_nums=None, use_image_id=None, return_tensors="pt",
  max_length=8192)`` (``chat()``'s default ``max_inp_length``)
* the processor returns ``pixel_values`` as a list (batch) of lists of ``[3, 14, L * 14]`` slices,
  ``tgt_sizes`` as a list of ``[slices, 2]`` tensors, ``image_bound``, ``image_sizes`` and an
  ``attention_mask`` that is ``input_ids != 0``
* ``get_vllm_embedding(data)`` returns ``(embeddings, vision_hidden_states)``, the latter a per-prompt list of
  the resampler's ``[slices, query_num, hidden]`` outputs in the embedding dtype
* ``forward(data, **kwargs)`` takes ``data["position_ids"]`` and gives the other keyword arguments to the
  language model; the positions and the mask are the ones ``generate`` derives from ``attention_mask`` for its
  prefill (``cumsum - 1``, 1 where masked)
* ``generate(**inputs, tokenizer=..., decode_text=False, ...)`` returns the language model's
  ``generate(inputs_embeds=...)`` output, i.e. the new tokens only; ``chat(sampling=False)`` passes
  ``num_beams`` 3 and ``repetition_penalty`` 1.2 unless overridden by keyword, ``pad_token_id`` 0 and the
  ``<|im_end|>`` / ``<|endoftext|>`` stop ids

Two things in the remote code stop it from importing under a torch newer than the one it was written for, and
the reference step works around both without changing a computed value: ``resampler.py`` takes ``List`` from
``from torch.nn.functional import *`` (gone from newer torch; the step puts ``typing.List`` in ``builtins``), and
``modeling_minicpmv.py`` imports torchvision without using it (an empty module stands in when it does not import,
e.g. a CUDA torchvision next to a CPU torch). The step prints a note when it applies either.

The original's ``attention_mask`` is ``input_ids != 0``: an id 0 in the prompt ("!" in the Qwen2 vocabulary) is
masked, and later positions shift by one. Ours attends to it; ``compare`` says how many positions that concerns.
The original decodes its answer without ``skip_special_tokens`` and drops every id 0; ``compare`` says so when the
answer ids agree and the texts do not.

``scripts/check_minicpmv_fp.sh`` runs all three.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reference step's Python lacks this project
from check_fp_common import (ROOT, SETTINGS, add_run_settings, compare_answers, compare_features,  # noqa: E402
                             compare_ids, compare_logits, finish, first_difference, inside_span, low_cpu_mem,
                             open_compare, ours_settings, parse, parser, read_json, read_pt, reference_settings,
                             versions, write_json, write_settings)

IMAGE_MARK = "(<image>./</image>)"
MAX_INP_LENGTH = 8192  # chat()'s default max_inp_length


def pad_strips(strips: list[torch.Tensor]) -> torch.Tensor:
    """``[slices, 3, 14, Lmax * 14]``: per-slice strips right-padded with zeros, the layout our processor returns."""
    width = max(s.shape[-1] for s in strips)
    return torch.stack([torch.nn.functional.pad(s.float(), (0, width - s.shape[-1])) for s in strips])


def ours(a: argparse.Namespace) -> None:
    """Our model on the image and question; writes ours.pt, prompt.json and settings.json to ``a.work``."""
    sys.path.insert(0, ROOT)
    from PIL import Image

    from model.minicpmv.loading import load
    from model.minicpmv.processor import best_grid

    path = os.path.abspath(a.image)
    dtype, max_new = ours_settings(a)
    beams, penalty = (1, 1.0) if a.greedy else (3, 1.2)
    model, proc = load(a.model_path, a.device, dtype)
    tok = proc.tokenizer
    image = Image.open(path).convert("RGB")
    inputs = proc(a.question, [image])
    prompt = proc.prompt(a.question, 1)
    grid = best_grid(*image.size, proc.cfg.scale_resolution, proc.max_slice_nums)
    text = prompt.replace(IMAGE_MARK, proc.placeholder(0, grid), 1)
    if tok(text, add_special_tokens=False)["input_ids"] != inputs["input_ids"][0].tolist():
        raise SystemExit("the processor's ids are not the expanded prompt's: the saved text would not encode them")
    dev = {k: v.to(a.device) for k, v in inputs.items()}
    with torch.no_grad():
        feats = model.vision_features(dev["pixel_values"], dev["tgt_sizes"]).float().cpu()
        logits = model(**dev).logits.float().cpu()
        answer = model.generate(**dev, max_new_tokens=max_new, num_beams=beams, repetition_penalty=penalty)
    n = inputs["input_ids"].shape[1]
    answer_ids = answer[0, n:].cpu()
    os.makedirs(a.work, exist_ok=True)
    torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                "tgt_sizes": inputs["tgt_sizes"], "features": feats, "logits": logits, "answer_ids": answer_ids},
               os.path.join(a.work, "ours.pt"))
    write_json(a.work, "prompt.json", {"prompt": prompt, "text": text, "image": path, "question": a.question,
                                       "grid": list(grid) if grid else None, "answer": proc.decode(answer_ids)})
    write_settings(a, dtype, max_new, num_beams=beams, repetition_penalty=penalty,
                   stop_ids=list(model.generation_eos), span_pairs=[list(p) for p in model.span_pairs])
    print(f"ours: {n} prompt tokens, {inputs['pixel_values'].shape[0]} slices (grid {grid}), "
          f"answer {proc.decode(answer_ids)!r}")


def chat_prompt(tokenizer, question: str) -> str:
    """The text ``chat()`` makes of ``msgs=[{"role": "user", "content": [image, question]}]`` without a system
    prompt, before the processor expands the image mark."""
    msgs = [{"role": "user", "content": "\n".join([IMAGE_MARK, question])}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _remote_code_shims() -> None:
    """Lets the 2024 remote code import under a newer torch: neither shim changes a computed value."""
    import builtins
    import types
    import typing

    import torch.nn.functional as F

    # resampler.py annotates with List, which it gets from ``from torch.nn.functional import *``; newer torch
    # no longer imports it there, and annotations are evaluated when the module is imported
    if not hasattr(F, "List") and not hasattr(builtins, "List"):
        builtins.List = typing.List
        print("note: torch.nn.functional has no List; made typing.List visible to the remote resampler.py")
    try:
        import torchvision  # noqa: F401  (modeling_minicpmv.py imports it and never uses it)
    except Exception as e:  # a missing one, or one built for another torch, fails on import
        sys.modules["torchvision"] = types.ModuleType("torchvision")
        print(f"note: torchvision does not import ({type(e).__name__}); an empty module stands in for it")


def reference(a: argparse.Namespace) -> None:
    """The checkpoint's remote code on the same image and question; writes reference.pt / .json to ``a.work``."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    work = os.path.abspath(a.work)
    model_path = os.path.abspath(a.model_path)
    settings = read_json(work, "settings.json")
    prompt_info = read_json(work, "prompt.json")
    dtype_name, dtype, max_new = reference_settings(a, settings)
    beams, penalty = settings["num_beams"], settings["repetition_penalty"]
    saved = read_pt(work, "ours.pt")
    _remote_code_shims()
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True, torch_dtype=dtype,
                                      **low_cpu_mem()).eval().to(a.device)
    image = Image.open(prompt_info["image"]).convert("RGB")
    prompt = chat_prompt(processor.tokenizer, prompt_info["question"])
    if prompt != prompt_info["prompt"]:
        print(f"note: the remote chat template gives {prompt!r}, ours {prompt_info['prompt']!r}")
    inputs = processor([prompt], [[image]], max_slice_nums=None, use_image_id=None, return_tensors="pt",
                       max_length=MAX_INP_LENGTH).to(a.device)
    inputs.pop("image_sizes")
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"]
    # what generate() derives for its prefill from the ids != 0 mask chat() passes
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    data = {"input_ids": ids, "pixel_values": inputs["pixel_values"], "tgt_sizes": inputs["tgt_sizes"],
            "image_bound": inputs["image_bound"], "position_ids": pos}
    slices = [s.float().cpu() for s in inputs["pixel_values"][0]]
    tgt = inputs["tgt_sizes"][0].to(torch.int32).cpu()
    # our strips cut back to each slice's own length: their tower on our pixels separates slicing from modelling
    ours_tgt = saved["tgt_sizes"].to(torch.int32)
    patch = saved["pixel_values"].shape[-2]
    ours_slices = [strip[:, :, :h * w * patch].to(a.device)
                   for strip, (h, w) in zip(saved["pixel_values"], ours_tgt.tolist())]
    with torch.no_grad():
        _, vision = model.get_vllm_embedding({k: data[k] for k in ("input_ids", "pixel_values", "tgt_sizes",
                                                                   "image_bound")})
        feats = vision[0].float().cpu()
        vision_ours = None
        if len(ours_slices) == len(slices):  # the embedding scatter needs as many slices as the prompt has slots
            _, vision_ours = model.get_vllm_embedding({"input_ids": ids, "pixel_values": [ours_slices],
                                                       "tgt_sizes": [ours_tgt.to(a.device)],
                                                       "image_bound": inputs["image_bound"]})
        logits = model(data, attention_mask=mask.long(), use_cache=False).logits.float().cpu()
        out = model.generate(**inputs, tokenizer=tok, max_new_tokens=max_new, decode_text=False,
                             num_beams=beams, repetition_penalty=penalty)
    # chat() re-runs the same search; its text is what a user of the checkpoint sees
    msgs = [{"role": "user", "content": [image, prompt_info["question"]]}]
    answer = model.chat(image=None, msgs=msgs, tokenizer=tok, processor=processor, sampling=False,
                        max_new_tokens=max_new, num_beams=beams, repetition_penalty=penalty)
    result = {"input_ids": ids.cpu().long(), "attention_mask": mask.cpu().long(), "pixel_values": pad_strips(slices),
              "tgt_sizes": tgt, "features": feats, "logits": logits, "answer_ids": out[0].cpu()}
    if vision_ours is not None:
        result["features_our_pixels"] = vision_ours[0].float().cpu()
    torch.save(result, os.path.join(work, "reference.pt"))
    write_json(work, "reference.json", {
        "prompt": prompt, "answer": answer, "answer_from_ids": model._decode_text(out, tok)[0],
        "image_bound": inputs["image_bound"][0].tolist(), "dtype": dtype_name, "device": str(a.device),
        "max_new_tokens": max_new, "num_beams": beams, "repetition_penalty": penalty, **versions()})
    print(f"reference: {ids.shape[1]} prompt tokens, {len(slices)} slices from the checkpoint's processor, "
          f"answer {answer!r}")


def image_slots(ids: torch.Tensor, pairs: list[list[int]]) -> torch.Tensor:
    """Bool: positions strictly inside an ``<image>`` / ``</image>`` or ``<slice>`` / ``</slice>`` pair."""
    inside = torch.zeros_like(ids, dtype=torch.bool)
    for open_id, close_id in pairs:
        inside |= inside_span(ids, open_id, close_id) & (ids != open_id)
    return inside


def compare(a: argparse.Namespace) -> None:
    """Prints and writes compare.json; exits 1 when the token ids differ or top-1 agreement < 99%."""
    o, r, settings, answers = open_compare(a.work)
    result: dict = {}
    problems = []
    first = compare_ids(o, r, result, problems)
    if "attention_mask" in r and not bool(r["attention_mask"].all()):
        # the original masks every id 0 ("!" in the Qwen2 vocabulary) as if it were padding; we attend to it
        result["reference_masked_positions"] = int((r["attention_mask"] == 0).sum())
        print(f"note: the reference masks {result['reference_masked_positions']} prompt positions holding id 0; "
              "ours attends to them, so logits after them may differ")

    ot, rt = o["tgt_sizes"].long().tolist(), r["tgt_sizes"].long().tolist()
    result["tgt_sizes_identical"] = ot == rt
    result["slices"] = {"ours": len(ot), "reference": len(rt)}
    if ot == rt:
        print(f"slices: {len(ot)}, (rows, cols) identical: {ot}")
    else:
        bad = first_difference(ot, rt)
        result["tgt_sizes_first_difference"] = bad
        print(f"slices: DIFFERENT (rows, cols): ours {ot}, reference {rt} (first difference at slice {bad})")
        if not problems:
            problems.append(f"slice sizes differ at slice {bad}")

    if ot == rt:
        width = min(o["pixel_values"].shape[-1], r["pixel_values"].shape[-1])
        result["pixels_max_abs"] = float((o["pixel_values"][..., :width].float()
                                          - r["pixel_values"][..., :width].float()).abs().max())
        print(f"pixels: max abs difference {result['pixels_max_abs']:.3e} (normalized units, [-1, 1])")
    compare_features(o, r, result, "features", "vision features", (
        ("features", "reference on its own slices"), ("features_our_pixels", "reference on our slices")))
    compare_logits(o, r, first, result, problems, lambda ids: ~image_slots(ids, settings.get("span_pairs", [])),
                   "slots", count_text=True)
    # both searches end at a stop id (kept by one, dropped by the other when max_new_tokens ends the search)
    same_answer_ids = compare_answers(o, r, settings, answers, result, f"; {settings.get('num_beams')} beams, "
                                      f"repetition penalty {settings.get('repetition_penalty')}")
    if "reference" in answers:
        result["answer_text_identical"] = answers["ours"] == answers["reference"]
        if same_answer_ids and not result["answer_text_identical"]:
            # the original decodes without skip_special_tokens and drops every id 0 ("!")
            print("answer texts differ on the same ids: the decoding differs, not the model")

    finish(a.work, result, problems, settings, SETTINGS + ("num_beams", "repetition_penalty"))


def main() -> None:
    p = parser(__doc__, "outputs/check_minicpmv_fp")
    add_run_settings(p)
    p.add_argument("--greedy", action="store_true",
                   help="ours: one beam without repetition penalty instead of chat(sampling=False)'s 3 beams and "
                        "1.2 (the reference step follows)")
    a = parse(p)
    {"ours": ours, "reference": reference, "compare": compare}[a.step](a)


if __name__ == "__main__":
    main()
