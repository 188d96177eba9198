"""Bootstrap intervals and paired agreement (evaluation/uncertainty.py)."""
import math
import random

import pytest

from evaluation.uncertainty import bootstrap, overall, units
from evaluation.scorers import score


def reading_rows(n):
    return [{"index": i, "question": "q", "answer": f"w{i}", "category": "reading"} for i in range(n)]


def yn_rows(n_images):
    rows = []
    for i in range(n_images):
        for j, a in enumerate(("Yes", "No")):
            rows.append({"index": 2 * i + j, "question": "q", "answer": a, "category": "color",
                         "image_path": f"img/{i}.png"})
    return rows


def test_interval_matches_the_normal_approximation_of_a_proportion():
    # Reading is a plain hit rate, so the bootstrap interval must come close to p +- 1.96 sqrt(p (1 - p) / n).
    n = 400
    rng = random.Random(1)
    rows = reading_rows(n)
    preds = [r["answer"] if rng.random() < 0.3 else "nothing" for r in rows]
    u = bootstrap("SynthBench_OCR", rows, preds, n_boot=1000, seed=0)
    p = u.score / 100
    half = 196 * math.sqrt(p * (1 - p) / n)
    assert u.score == pytest.approx(score("SynthBench_OCR", rows, preds)["Overall"])
    assert u.low == pytest.approx(u.score - half, abs=1.0)
    assert u.high == pytest.approx(u.score + half, abs=1.0)


def test_question_pairs_are_drawn_together():
    # One answer of every pair right: acc 50, acc+ 0 in every draw that keeps pairs whole, so the interval is
    # a point; drawing rows one by one would scatter acc+ (pairs made of one right row twice).
    rows = yn_rows(60)
    preds = ["Yes"] * len(rows)
    assert [len(u) for u in units(rows)] == [2] * 60
    u = bootstrap("SynthBench_YN", rows, preds, n_boot=200)
    assert u.score == pytest.approx(25.0)
    assert u.low == pytest.approx(25.0) and u.high == pytest.approx(25.0)


def test_paired_difference_and_agreement():
    rng = random.Random(2)
    rows = reading_rows(300)
    ref = [r["answer"] if rng.random() < 0.6 else "x" for r in rows]
    same = bootstrap("SynthBench_OCR", rows, list(ref), ref, n_boot=300)
    assert same.agreement == 100.0
    assert (same.diff, same.diff_low, same.diff_high) == (0.0, 0.0, 0.0)
    assert same.distinguishable() is False

    # flip 5 of the reference's right answers: a small paired difference, not told apart from 0
    right = [i for i, (r, p) in enumerate(zip(rows, ref)) if p == r["answer"]]
    few = list(ref)
    for i in right[:5]:
        few[i] = "y"
    u = bootstrap("SynthBench_OCR", rows, few, ref, n_boot=400)
    assert u.agreement == pytest.approx(100 * (300 - 5) / 300)
    assert u.diff == pytest.approx(-500 / 300)
    assert u.diff_high <= 0.0 and u.diff_low < 0.0
    # the unpaired intervals overlap almost entirely, the paired one sits next to 0
    assert u.high > same.score

    # flip 60: clearly worse
    many = list(ref)
    for i in right[:60]:
        many[i] = "y"
    w = bootstrap("SynthBench_OCR", rows, many, ref, n_boot=400)
    assert w.distinguishable() is True and w.diff_high < -10


def test_deterministic_for_a_seed_and_bad_input():
    rows = reading_rows(50)
    preds = [r["answer"] if i % 3 else "" for i, r in enumerate(rows)]
    a = bootstrap("SynthBench_OCR", rows, preds, seed=5, n_boot=100)
    b = bootstrap("SynthBench_OCR", rows, preds, seed=5, n_boot=100)
    assert a == b
    with pytest.raises(ValueError, match="50 rows, 49 predictions"):
        bootstrap("SynthBench_OCR", rows, preds[:-1])
    with pytest.raises(ValueError, match="reference"):
        bootstrap("SynthBench_OCR", rows, preds, preds[:3])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap("SynthBench_OCR", rows, preds, n_boot=1)


def test_overall_is_the_tables_number():
    rows = yn_rows(4)
    preds = ["Yes", "No", "Yes", "Yes", "No", "No", "Yes", "No"]
    s = score("SynthBench_YN", rows, preds)
    # 6 of 8 right (acc 75), 2 of 4 pairs whole (acc+ 50): (75 + 50) / 2
    assert overall("SynthBench_YN", s) == pytest.approx(62.5)
    assert overall("OCRBench", {"Final Score Norm": 41.2, "Final Score": 412}) == 41.2


def test_table_mean_uses_the_same_draws():
    rng = random.Random(3)
    rows = reading_rows(120)
    yn = yn_rows(60)
    ref_r = [r["answer"] if rng.random() < 0.5 else "x" for r in rows]
    ref_y = [r["answer"] if rng.random() < 0.7 else "Unknown" for r in yn]
    from evaluation.uncertainty import bootstrap_table
    t = bootstrap_table({"SynthBench_OCR": (rows, ref_r, ref_r), "SynthBench_YN": (yn, ref_y, ref_y)}, n_boot=100)
    assert t["mean"].score == pytest.approx((t["SynthBench_OCR"].score + t["SynthBench_YN"].score) / 2)
    assert (t["mean"].diff_low, t["mean"].diff_high, t["mean"].agreement) == (0.0, 0.0, 100.0)
    assert t["mean"].low < t["mean"].score < t["mean"].high
    with pytest.raises(ValueError, match="every dataset or for none"):
        bootstrap_table({"SynthBench_OCR": (rows, ref_r, ref_r), "SynthBench_YN": (yn, ref_y, None)})
