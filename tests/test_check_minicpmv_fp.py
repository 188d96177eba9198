"""scripts/check_minicpmv_fp.py on a tiny MiniCPM-V 2.6 checkpoint: the 'ours' and 'compare' steps.

The 'reference' step runs the checkpoint's own remote code (``modeling_minicpmv.py`` and its siblings) under
transformers 4.40-4.45, with ``trust_remote_code``; the tiny checkpoints hold no remote code, this environment's
transformers 5 cannot run it, and the network is not there to fetch either: it is not tested here. Its files are
made from our own outputs instead, once identical (up to tiny noise) and once with a changed token id, swapped
slice sizes, logits negated everywhere or only in the image slots.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.minicpmv.tiny import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_minicpmv_fp.py")
QUESTION = "What is it?"


def script():
    spec = importlib.util.spec_from_file_location("check_minicpmv_fp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare_here(work: Path, capsys) -> tuple[int, str]:
    """The compare step in this process (exit status, stdout): a subprocess per case would double the test time."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        script().compare(argparse.Namespace(work=str(work)))
    return done.value.code, capsys.readouterr().out


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("check-minicpmv")
    folder = write_checkpoint(str(tmp / "ckpt"), seed=13)
    img = tmp / "img.png"
    g = torch.Generator().manual_seed(2)
    # 150 x 50 at the tiny 56-px scale: a source view and a 3 x 1 grid of slices
    Image.fromarray((torch.rand(50, 150, 3, generator=g) * 255).to(torch.uint8).numpy()).save(img)
    work = tmp / "work"
    # in this process: a second interpreter would pay the torch / transformers imports again
    script().ours(argparse.Namespace(model_path=folder, image=str(img), question=QUESTION, work=str(work),
                                     device="cpu", dtype="float32", max_new_tokens=3, greedy=False))
    return work, str(img)


def fake_reference(work: Path, saved: dict, **changes) -> None:
    """reference.pt / reference.json as the reference step writes them, from our tensors with ``changes``."""
    stop = json.load(open(work / "settings.json"))["stop_ids"]
    ref = {"input_ids": saved["input_ids"].clone(), "attention_mask": torch.ones_like(saved["input_ids"]),
           "pixel_values": saved["pixel_values"].clone(), "tgt_sizes": saved["tgt_sizes"].clone(),
           "features": saved["features"], "features_our_pixels": saved["features"], "logits": saved["logits"],
           # transformers' generate keeps the stop id that ends the best beam
           "answer_ids": torch.cat([saved["answer_ids"], torch.tensor([stop[0]])])}
    ref.update(changes)
    torch.save(ref, work / "reference.pt")
    json.dump({"answer": json.load(open(work / "prompt.json"))["answer"]}, open(work / "reference.json", "w"))


def test_ours_writes_the_sliced_inputs_and_the_chat_prompt(ours):
    work, img = ours
    saved = torch.load(work / "ours.pt")
    prompt = json.load(open(work / "prompt.json"))
    settings = json.load(open(work / "settings.json"))
    assert prompt["image"] == img and prompt["grid"] == [3, 1]
    assert f"<|im_start|>user\n(<image>./</image>)\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n" in prompt["prompt"]
    slot = "<unk>" * 16
    assert (f"<image_id>0</image_id><image>{slot}</image>" + f"<slice>{slot}</slice>" * 3 + f"\n{QUESTION}"
            in prompt["text"])
    assert saved["tgt_sizes"].tolist() == [[2, 7], [4, 4], [4, 4], [4, 4]]
    assert saved["pixel_values"].shape == (4, 3, 14, 16 * 14) and saved["features"].shape == (4, 16, 384)
    assert saved["logits"].shape[:2] == saved["input_ids"].shape and 1 <= saved["answer_ids"].numel() <= 3
    assert (settings["dtype"], settings["device"], settings["max_new_tokens"]) == ("float32", "cpu", 3)
    assert (settings["num_beams"], settings["repetition_penalty"]) == (3, 1.2)
    slots = script().image_slots(saved["input_ids"][0], settings["span_pairs"])
    assert int(slots.sum()) == 4 * 16


def test_compare_passes_on_identical_and_slightly_perturbed_reference(ours):
    work, _ = ours
    saved = torch.load(work / "ours.pt")
    g = torch.Generator().manual_seed(0)
    fake_reference(work, saved, logits=saved["logits"] + 1e-6 * torch.randn(saved["logits"].shape, generator=g),
                   features=saved["features"] * (1 + 1e-6))
    done = subprocess.run([sys.executable, SCRIPT, "compare", "--work", str(work)], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "token ids: identical" in done.stdout and done.stdout.rstrip().endswith("MATCH")
    result = json.load(open(work / "compare.json"))
    assert result["match"] and result["ids_identical"] and result["tgt_sizes_identical"]
    assert result["answer_ids_identical"] and result["top1_agreement"] == 1.0
    assert result["top1_agreement_text"] == 1.0 and 0 < result["logits_rel"] < 1e-5
    assert result["pixels_max_abs"] == 0.0 and 0 < result["features_rel"] < 1e-5
    assert result["features_our_pixels_rel"] == 0.0


def test_compare_fails_on_a_changed_id_on_swapped_slices_and_on_negated_logits(ours, capsys):
    work, _ = ours
    saved = torch.load(work / "ours.pt")
    ids = saved["input_ids"].clone()
    ids[0, 5] += 1
    fake_reference(work, saved, input_ids=ids)
    code, out = compare_here(work, capsys)
    assert code == 1 and "MISMATCH: token ids differ at position 5" in out, out
    result = json.load(open(work / "compare.json"))
    assert not result["match"] and result["ids_first_difference"] == 5 and result["positions"] == 5

    fake_reference(work, saved, tgt_sizes=saved["tgt_sizes"].flip(-1))
    code, out = compare_here(work, capsys)
    assert code == 1 and "MISMATCH: slice sizes differ at slice 0" in out, out

    fake_reference(work, saved, logits=-saved["logits"])
    code, out = compare_here(work, capsys)
    assert code == 1 and "MISMATCH: top-1 agreement" in out, out


def test_agreement_outside_the_image_slots_is_reported_apart(ours, capsys):
    work, _ = ours
    saved = torch.load(work / "ours.pt")
    settings = json.load(open(work / "settings.json"))
    slots = script().image_slots(saved["input_ids"][0], settings["span_pairs"])
    logits = saved["logits"].clone()
    logits[0, slots] = -logits[0, slots]
    mask = torch.ones_like(saved["input_ids"])
    mask[0, 3] = 0  # as the original's ids != 0 mask would have it for a "!" there
    fake_reference(work, saved, logits=logits, attention_mask=mask)
    code, out = compare_here(work, capsys)
    result = json.load(open(work / "compare.json"))
    assert code == 1 and result["top1_agreement_text"] == 1.0 and result["top1_agreement"] < 0.99, out
    assert "outside the image slots 100.0%" in out and result["reference_masked_positions"] == 1
