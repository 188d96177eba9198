import json

import pytest
import torch

from evaluation import datasets
from evaluation.eval import evaluate
from model import registry
from tests import DEVICE, main

FIX = "tests/fixtures"


def test_load_all_fixture_formats_and_resolve_mme_references():
    for name, n in (("OCRBench", 12), ("MME", 10), ("TextVQA_VAL", 6), ("DocVQA_VAL", 6)):
        rows = datasets.load_rows(FIX, name)
        assert len(rows) == n
        assert datasets.image_of(rows[0]).size == (96, 64)
    mme = datasets.load_rows(FIX, "MME")
    assert mme[1]["image"] == mme[0]["image"] and mme[1]["image_ref"] == "300"
    assert mme[1]["image_group"] == mme[0]["image_group"] == "300"


def test_missing_file_column_and_bad_image_fail_clearly(tmp_path):
    with pytest.raises(datasets.DatasetError, match=r"OCRBench.tsv not found: put VLMEvalKit's OCRBench.tsv there"):
        datasets.load_rows(str(tmp_path), "OCRBench")
    (tmp_path / "Bad.tsv").write_text("index\tquestion\timage\n0\tq\tabc\n")
    with pytest.raises(datasets.DatasetError, match=r"lacks column\(s\) \['answer'\]"):
        datasets.load_rows(str(tmp_path), "Bad")
    (tmp_path / "Img.tsv").write_text("index\timage\tquestion\tanswer\n0\t" + "A" * 80 + "\tq\ta\n")
    row = datasets.load_rows(str(tmp_path), "Img")[0]
    with pytest.raises(datasets.DatasetError, match="row 0: the image does not decode"):
        datasets.image_of(row)


def test_calibration_rows_are_never_scored_and_pairs_stay_whole():
    rows = datasets.load_rows(FIX, "MME")
    for seed in range(5):
        sp = datasets.split_rows(rows, 3, seed)
        calib = {r["index"] for r in sp.calib}
        scored = {r["index"] for r in sp.eval}
        assert len(sp.calib) >= 3 and not calib & scored and len(calib | scored) == len(rows)
        groups = {r["image_group"] for r in sp.calib}
        assert not groups & {r["image_group"] for r in sp.eval}  # MME pairs are not split
    other = datasets.load_rows(FIX, "OCRBench")
    sp = datasets.split_rows(rows, 4, 0, calib_rows=other, calib_source="OCRBench")
    assert len(sp.eval) == len(rows) and len(sp.calib) == 4
    with pytest.raises(datasets.DatasetError, match="would leave nothing to score"):
        datasets.split_rows(rows, 10, 0)


def test_interrupted_evaluation_resumes_without_recomputing(tmp_path):
    ad = registry.get("qwen2vl")
    loaded = ad.load("tiny", DEVICE, torch.float32)
    rows = datasets.load_rows(FIX, "TextVQA_VAL")
    meta = {"run": "a"}
    first = evaluate(ad, loaded, "TextVQA_VAL", rows, str(tmp_path), DEVICE, 3, meta)
    path = tmp_path / "TextVQA_VAL_predictions.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + len(rows)
    path.write_text("\n".join(lines[:3]) + "\n")  # as if the run had stopped after two rows
    calls = []
    real = loaded.model.generate
    loaded.model.generate = lambda *a, **k: calls.append(1) or real(*a, **k)
    second = evaluate(ad, loaded, "TextVQA_VAL", rows, str(tmp_path), DEVICE, 3, meta)
    assert len(calls) == len(rows) - 2 and second["rows_resumed"] == 2
    assert second["scores"] == first["scores"]
    with pytest.raises(RuntimeError, match="holds predictions of another run"):
        evaluate(ad, loaded, "TextVQA_VAL", rows, str(tmp_path), DEVICE, 3, {"run": "b"})


def test_quant_script_on_a_benchmark_writes_scores(tmp_path):
    out = main("qwen2vl", ["--model_path", "tiny", "--dataset_name", "OCRBench", "--data_root", FIX, "--rotate",
                           "--rotate_llm", "--quant", "--quant_llm", "--llm_static", "--llm_w_rtn", "--nsamples", "2",
                           "--calib_num", "3", "--max_new_tokens", "3", "--output_dir", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    ev = res["evaluation"]
    assert set(ev["scores"]) >= {"Final Score", "Final Score Norm"}
    held = set(res["calibration"]["held_out_rows"])
    assert len(held) >= 3 and ev["rows_scored"] == 12 - len(held)
    scored = [json.loads(line)["index"] for line in open(ev["predictions_file"]) if '"index"' in line]
    assert not {str(i) for i in scored} & held
    assert out["results"]["evaluation"]["scores"]["Final Score Norm"] == ev["scores"]["Final Score"] / 10
    iv = ev["interval_95"]  # the score with its bootstrap interval, on the same scale as Final Score Norm
    assert iv["score"] == pytest.approx(ev["scores"]["Final Score Norm"]) and iv["low"] <= iv["score"] <= iv["high"]
    assert "predictions" not in ev


def test_prompts_follow_vlmevalkit_per_family():
    row = {"question": "what is written?"}
    q2, q25 = registry.get("qwen2vl"), registry.get("qwen2_5vl")
    assert q2.prompt("OCRBench", row).endswith("Please try to answer the question with short words or phrases if possible.")
    assert q25.prompt("OCRBench", row) == "what is written?"
    assert q25.prompt("TextVQA_VAL", row) == "what is written?\nAnswer the question using a single word or phrase."
    assert q2.prompt("MME", row) == q25.prompt("MME", row) == "what is written?"
    assert q2.pixel_budget("OCRBench") == {"shortest_edge": 78400, "longest_edge": 16384 * 28 * 28}


def test_demo_calibration_rows_per_seed():
    """The demo's calibration draw: seed 0 is the even spread over the three calibration files, another seed a
    reproducible random draw of as many rows; never an evaluation row."""
    from evaluation import synthbench
    from exam.demo_minivlm import calibration_keys as keys
    from exam.demo_minivlm import calibration_rows

    spread = calibration_rows(32, 64)
    assert len(spread) == 64 and {r["calib_file"] for r in spread} == {f"{s}_calib" for s in synthbench.SUBSETS}
    assert keys(spread)[:3] == ["SynthBench_OCR_calib:0", "SynthBench_OCR_calib:3", "SynthBench_OCR_calib:6"]
    one, again, two = calibration_rows(32, 64, 1), calibration_rows(32, 64, 1), calibration_rows(32, 64, 2)
    assert keys(one) == keys(again) and len(set(keys(one))) == 64
    assert keys(one) != keys(two) and keys(one) != keys(spread)
    assert len(calibration_rows(8, 300, 3)) == 192  # never more rows than the files hold
    assert all(r["calib_file"].endswith("_calib") for r in one + two)
