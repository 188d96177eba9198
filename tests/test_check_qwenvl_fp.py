"""scripts/check_qwenvl_fp.py on a tiny Qwen-VL-Chat checkpoint: the 'ours' and 'compare' steps.

The 'reference' step runs the checkpoint's own remote code (transformers' ``trust_remote_code``), which neither
the tiny checkpoints nor this environment have, and cannot reach the network for: it is not tested here. Its
files are made from our own outputs instead, once identical and once with a changed token id, a slightly
perturbed or a negated logit tensor.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from model.qwenvl.tiny import write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_qwenvl_fp.py")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


def compare_here(work, capsys) -> tuple[int, str]:
    """The compare step in this process (exit status, stdout): a subprocess per case would double the test time."""
    spec = importlib.util.spec_from_file_location("check_qwenvl_fp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        mod.compare(argparse.Namespace(work=str(work)))
    return done.value.code, capsys.readouterr().out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check-qwenvl")
    folder = write_checkpoint(str(tmp / "ckpt"), seed=11)
    img = tmp / "img.png"
    Image.new("RGB", (90, 60), (30, 90, 200)).save(img)
    work = tmp / "work"
    done = run("ours", "--model_path", folder, "--image", str(img), "--work", str(work), "--device", "cpu",
               "--dtype", "float32", "--max_new_tokens", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    return work, str(img)


def fake_reference(work, saved: dict, **changes) -> None:
    """reference.pt / reference.json as the reference step writes them, from our tensors with ``changes``."""
    stop = json.load(open(work / "settings.json"))["stop_ids"]
    ref = {"input_ids": saved["input_ids"].clone(), "pixel_values": saved["pixel_values"], "vit": saved["vit"],
           "vit_our_pixels": saved["vit"], "logits": saved["logits"],
           # the remote generate ends with <|endoftext|> after the stop word
           "answer_ids": torch.cat([saved["answer_ids"], torch.tensor([stop[-1]])])}
    ref.update(changes)
    torch.save(ref, work / "reference.pt")
    json.dump({"answer": json.load(open(work / "prompt.json"))["answer"]}, open(work / "reference.json", "w"))


def test_ours_writes_the_prompt_the_original_tokenizer_makes(ours):
    work, img = ours
    saved = torch.load(work / "ours.pt")
    prompt = json.load(open(work / "prompt.json"))
    settings = json.load(open(work / "settings.json"))
    assert f"Picture 1: <img>{img}</img>\n" in prompt["text"] and prompt["image"] == img
    assert (settings["dtype"], settings["device"], settings["max_new_tokens"]) == ("float32", "cpu", 3)
    ids = saved["input_ids"][0].tolist()
    start = ids.index(settings["image_start_id"])
    # the original model reads the path back out of these slots to open the image
    path = img.encode("utf-8")
    assert ids[start + 1:start + 1 + len(path)] == list(path)
    assert ids[start + 257] == settings["image_start_id"] + 1
    assert saved["logits"].shape[:2] == saved["input_ids"].shape and saved["vit"].shape[1] == 256
    assert saved["pixel_values"].shape == (1, 3, 56, 56) and 1 <= saved["answer_ids"].numel() <= 3


def test_compare_passes_on_identical_and_slightly_perturbed_reference(ours):
    work, _ = ours
    saved = torch.load(work / "ours.pt")
    fake_reference(work, saved, logits=saved["logits"] + 1e-6 * torch.randn(saved["logits"].shape,
                                                                         generator=torch.Generator().manual_seed(0)))
    done = run("compare", "--work", str(work))
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "token ids: identical" in done.stdout and done.stdout.rstrip().endswith("MATCH")
    result = json.load(open(work / "compare.json"))
    assert result["match"] and result["ids_identical"] and result["answer_ids_identical"]
    assert result["top1_agreement"] == 1.0 and 0 < result["logits_rel"] < 1e-5
    assert result["pixels_max_abs"] == 0.0 and result["vit_rel"] == 0.0


def test_compare_fails_on_a_changed_token_id_and_on_negated_logits(ours, capsys):
    work, _ = ours
    saved = torch.load(work / "ours.pt")
    ids = saved["input_ids"].clone()
    ids[0, 5] += 1
    fake_reference(work, saved, input_ids=ids)
    code, out = compare_here(work, capsys)
    assert code == 1 and "MISMATCH: token ids differ at position 5" in out, out
    result = json.load(open(work / "compare.json"))
    assert not result["match"] and result["ids_first_difference"] == 5 and result["positions"] == 5

    fake_reference(work, saved, logits=-saved["logits"])
    code, out = compare_here(work, capsys)
    assert code == 1 and "MISMATCH: top-1 agreement" in out, out
