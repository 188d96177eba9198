"""GLM-4V through the command line: the paper's W4A8 flag set end to end on the fixtures, dump / load, the default
checkpoint folder, the opt-in online input Hadamards, and the real-checkpoint check script's ours and compare steps."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from exam.common import build_parser, config_from_args
from model import registry
from model.base import Sample
from tests import DEVICE, main

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
SCRIPT = os.path.join(os.path.dirname(FIX), "..", "scripts", "check_glm4v_fp.py")

W4A8 = ("--rotate --rotate_visual_clip --rotate_visual_cross_attn --rotate_llm --visual_w_bits 4 --visual_a_bits 8 "
        "--llm_w_bits 4 --llm_a_bits 8 --quant --quant_llm --quant_visual_clip --quant_cross_attention "
        "--visual_w_clip --llm_w_clip --visual_static --llm_static --online_llm_hadamard --act_order "
        "--dataset_name OCRBench --nsamples 2 --calib_num 2 --online_visual_hadamard --visual_split").split()


def logits(loaded, n=2):
    from evaluation.builtin import builtin_rows

    ad = registry.get("glm4v")
    bs = [ad.build_inputs(loaded, Sample([r["image"]], r["question"]), DEVICE) for r in builtin_rows(n, seed=21)]
    with torch.no_grad():
        return torch.cat([loaded.model(**b, use_cache=False).logits[0] for b in bs])


def test_paper_w4a8_command_end_to_end_then_dump_and_load(tmp_path):
    from fake_quant.quant_utils import PatchConvLinear, QuantLinear

    flags = W4A8 + ["--model_path", "tiny", "--data_root", FIX, "--max_new_tokens", "3"]
    dump = tmp_path / "glm4v-w4a8.pth"
    first = main("glm4v", flags + ["--output_dir", str(tmp_path / "a"), "--dump_gptq", str(dump)])
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    ev = res["evaluation"]
    assert res["model"]["adapter"] == "glm4v" and ev["rows_scored"] == 12 - 2
    assert {"Final Score", "Final Score Norm"} <= set(ev["scores"])
    model = first["loaded"].model
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert all(q.weight_quantized and q.input_quantizer.is_frozen for q in qls.values())
    v = model.transformer.vision
    assert isinstance(v.patch_embedding.proj, PatchConvLinear) and isinstance(v.conv, PatchConvLinear)
    assert {f"transformer.vision.linear_proj.{n}" for n in ("linear_proj", "gate_proj", "dense_h_to_4h",
                                                            "dense_4h_to_h")} <= set(qls)
    assert isinstance(v.transformer.layers[0].input_layernorm, torch.nn.LayerNorm)  # the post-norm tower keeps them
    rot = res["pipeline"]["rotation"]
    assert rot["visual"]["residual"] is False and len(rot["visual"]["online_hadamard"]) == 2
    assert rot["visual"]["online_input_hadamard"] == [] and rot["llm"]["residual"] is True
    # the tower and connector: one static scale set; the LLM: MSQ's two
    assert {q.input_quantizer.num_row_groups for n, q in qls.items() if n.startswith("transformer.vision.")} == {1}
    assert {q.input_quantizer.num_row_groups for n, q in qls.items() if n.startswith("transformer.encoder.")} == {2}
    second = main("glm4v", flags + ["--output_dir", str(tmp_path / "b"), "--load_gptq", str(dump)])
    assert "weights:llm" not in second["results"]["pipeline"]["seconds"]
    assert torch.equal(logits(first["loaded"]), logits(second["loaded"]))


def test_online_input_hadamard_flags():
    p = build_parser("glm4v")
    base = "--rotate --rotate_visual_clip --rotate_llm".split()
    cfg = config_from_args(p.parse_args(base + ["--online_visual_input_hadamard", "--online_llm_input_hadamard"]))
    assert cfg.rotation.online_visual_input_hadamard and cfg.rotation.online_llm_input_hadamard
    cfg = config_from_args(p.parse_args(["--rotate", "--rotate_llm", "--online_visual_input_hadamard"]))
    with pytest.raises(ValueError, match="--online_visual_input_hadamard needs --rotate_visual_clip"):
        cfg.validate()
    cfg = config_from_args(p.parse_args(["--rotate", "--rotate_visual_clip", "--online_llm_input_hadamard"]))
    with pytest.raises(ValueError, match="--online_llm_input_hadamard needs --rotate_llm"):
        cfg.validate()


def test_without_a_checkpoint_the_script_stops_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main("glm4v", W4A8 + ["--data_root", FIX])
    err = capsys.readouterr().err
    assert "weights/glm-4v-9b" in err and "--model_path" in err and "tiny" in err


def test_check_script_ours_and_compare_steps(tmp_path):
    """scripts/check_glm4v_fp.py: the 'ours' and 'compare' steps (the 'reference' step needs the remote code)."""
    from model.glm4v.tiny import builtin_folder

    img = tmp_path / "img.png"
    Image.new("RGB", (120, 60), (30, 90, 200)).save(img)
    work = tmp_path / "work"
    run = subprocess.run([sys.executable, SCRIPT, "ours", "--model_path", builtin_folder(), "--image", str(img),
                          "--work", str(work), "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = torch.load(work / "ours.pt")
    n_img = 9
    assert ours["logits"].shape[1] == ours["input_ids"].shape[1] + n_img - 1
    assert ours["vision"].shape[1] == n_img + 2 and ours["pixel_values"].shape == (1, 3, 84, 84)
    settings = json.loads((work / "settings.json").read_text())
    assert settings["dtype"] == "float32" and len(settings["stop_ids"]) == 3
    for scale, expect in ((1.0, 0), (-1.0, 1)):  # an identical reference matches, a negated one does not
        torch.save({"input_ids": ours["input_ids"], "pixel_values": ours["pixel_values"],
                    "vision_our_pixels": ours["vision"], "logits": ours["logits"] * scale,
                    "answer_ids": ours["answer_ids"]}, work / "reference.pt")
        cmp = subprocess.run([sys.executable, SCRIPT, "compare", "--work", str(work)], capture_output=True, text=True)
        assert cmp.returncode == expect and ("MATCH" if expect == 0 else "MISMATCH") in cmp.stdout, cmp.stdout
    result = json.loads((work / "compare.json").read_text())
    assert result["prompt_ids_identical"] and result["top1_agreement"] < 0.99
    shifted = torch.cat([ours["input_ids"][:, :1] + 1, ours["input_ids"][:, 1:]], dim=1)
    torch.save({"input_ids": shifted, "logits": ours["logits"], "answer_ids": ours["answer_ids"]}, work / "reference.pt")
    cmp = subprocess.run([sys.executable, SCRIPT, "compare", "--work", str(work)], capture_output=True, text=True)
    assert cmp.returncode == 1 and "first difference at 0" in cmp.stdout
