"""Each metric on hand-made predictions, against scores computed by hand (see the comments)."""
import json
import subprocess
import sys

import pytest

from evaluation import scorers as S
from evaluation.datasets import load_rows

FIX = "tests/fixtures"

OCR_PRED = [
    "The text is central.",  # 0 regular: 'central' in it -> 1
    "COFFEE",                # 1 irregular: lower-cased -> 1
    "sales",                 # 2 artistic: 'sale' is a substring -> 1
    "hallo",                 # 3 handwriting -> 0
    "40 96",                 # 4 digits -> 0
    "x q z t",               # 5 non-semantic -> 0
    "bobs",                  # 6 scene: "bob's" no, 'bobs' yes -> 1
    "The total is $12.50",   # 7 doc -> 1
    "03/04/2021",            # 8 KIE -> 0
    "$x^{2}+1$",             # 9 HME: spaces removed from the answer -> 1
    "Stop\nsign",            # 10 scene -> 1
    "ann\nlee",              # 11 doc: newline becomes a space -> 1
]


def test_ocrbench_hand_computed():
    rows = load_rows(FIX, "OCRBench")
    out = S.score("OCRBench", rows, OCR_PRED)
    assert out == {"Text Recognition": 3, "Scene Text-centric VQA": 2, "Doc-oriented VQA": 2,
                   "Key Information Extraction": 0, "Handwritten Mathematical Expression Recognition": 1,
                   "Final Score": 8, "Final Score Norm": 0.8}
    assert list(out) == ["Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                         "Handwritten Mathematical Expression Recognition", "Final Score", "Final Score Norm"]


def test_ocrbench_math_category_keeps_case_and_drops_spaces():
    hme = S.HME
    assert S.ocrbench_hit(hme, ["X ^ 2"], "x^2") == 0
    assert S.ocrbench_hit("Regular Text Recognition", ["X ^ 2"], "x ^ 2") == 1
    assert S.ocrbench_hit(hme, ["\\frac { a } { b }"], "\\frac{a}{b}") == 1
    assert S.ocrbench_hit("Regular Text Recognition", ["a b"], "ab") == 0


def test_textvqa_hand_computed():
    rows = load_rows(FIX, "TextVQA_VAL")
    preds = ["Nike.", "two", "stop", "3,000", "10.30", "don't"]
    # per row: 1, 1 (two -> 2), 0.6 (2 x 1/3 + 8 x 2/3), 1 (3,000 -> 3000), 0 (10.30 != 10:30), 0.9
    out = S.score("TextVQA_VAL", rows, preds)
    assert out == {"Overall": pytest.approx(75.0)}


@pytest.mark.parametrize("raw,norm", [
    ("The Two dogs!", "2 dogs"), ("x, y", "x y"), ("yes.", "yes"), ("3.5", "3.5"), ("1,000", "1000"),
    ("(hi)", "hi"), ("x-ray", "x ray"), ("x - ray", "x ray"), ("dont", "don't"),
    ("none", "0"), ("hadn'tve", "hadn't've"), ("somebody'd", "somebodyd"), ("what's\tup\n", "what's up"),
])
def test_vqa_normalization(raw, norm):
    assert S.normalize_vqa_answer(raw) == norm


def test_docvqa_hand_computed_and_threshold():
    rows = load_rows(FIX, "DocVQA_VAL")
    preds = ["inv-2041", "Acme Corporation", "May 4 2020", "Jon Smyth", "1250", "Strase"]
    # 1, 1 (second answer exact), 1 - 1/11, 1 - 2/10, 1 - 4/8 = 0.5 (kept: only < 0.5 is zeroed),
    # 1 - 1/7: one edit, over the length of "STRASSE" (the upper-cased answer), not of "Straße"
    expected = (1 + 1 + 10 / 11 + 0.8 + 0.5 + 6 / 7) / 6 * 100
    assert S.score("DocVQA_VAL", rows, preds)["Overall"] == pytest.approx(expected)
    assert S.anls(["abcdefghij"], "abcdeXXXXXX") == 0.0  # distance 6 / 11 -> 0.45 < 0.5 -> 0
    assert S.anls(["abcd"], "abcx") == pytest.approx(0.75)
    assert S.anls([""], "") == 1.0


def test_mme_hand_computed_pairs_and_totals():
    rows = load_rows(FIX, "MME")
    preds = ["Yes, it is red.", "No.",      # color image 0: both right
             "yes", "Yes",                  # color image 1: first wrong
             "I think yes and no", "no",    # count: 'Unknown' counts as wrong
             "Yes", "No",                   # OCR: both right
             "Nope", "yes"]                 # commonsense_reasoning: 'nope' is not 'no'
    out = S.score("MME", rows, preds)
    assert out == {"perception": pytest.approx(375.0), "reasoning": pytest.approx(50.0),
                   "color": pytest.approx(125.0), "count": pytest.approx(50.0), "OCR": pytest.approx(200.0),
                   "commonsense_reasoning": pytest.approx(50.0)}
    assert S.yes_no("Yes.") == "Yes" and S.yes_no("no, not yes") == "Unknown" and S.yes_no("nothing") == "Unknown"


def test_score_errors():
    with pytest.raises(ValueError, match="no scorer for dataset 'COCO'"):
        S.score("COCO", [{"answer": "a"}], ["a"])
    with pytest.raises(ValueError, match="2 rows but 1 predictions"):
        S.score("OCRBench", [{}, {}], ["a"])


def test_score_command_line(tmp_path):
    preds = tmp_path / "p.jsonl"
    rows = load_rows(FIX, "TextVQA_VAL")
    preds.write_text("".join(json.dumps({"index": r["index"], "prediction": p}) + "\n"
                             for r, p in zip(rows, ["Nike.", "two", "stop", "3,000", "10.30", "don't"])))
    out = subprocess.run([sys.executable, "-m", "evaluation.score", "TextVQA_VAL", f"{FIX}/TextVQA_VAL.tsv", str(preds)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["Overall"] == pytest.approx(75.0)
