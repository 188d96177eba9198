import filecmp
import os

import pytest

from evaluation import datasets, synthbench
from evaluation.scorers import score

DATA = os.path.join(os.path.dirname(synthbench.__file__), "synthbench_data")


def test_committed_files_are_what_the_generator_writes(tmp_path):
    synthbench.main(["--out", str(tmp_path)])
    for name in os.listdir(tmp_path):
        assert filecmp.cmp(tmp_path / name, os.path.join(DATA, name), shallow=False), name


@pytest.mark.parametrize("name,key,perfect", [("SynthBench_OCR", "Overall", 100.0), ("SynthBench_VQA", "Overall", 100.0),
                                               ("SynthBench_YN", "perception", 800.0)])
def test_right_answers_score_full_marks_and_wrong_ones_zero(name, key, perfect):
    from evaluation.scorers import parse_answers

    rows = datasets.load_rows(DATA, name)
    yn = name == "SynthBench_YN"
    right = [r["answer"] if yn else parse_answers(r["answer"])[0] for r in rows]
    assert score(name, rows, right)[key] == pytest.approx(perfect)
    wrong = [("No" if r["answer"] == "Yes" else "Yes") if yn else "?" for r in rows]
    assert score(name, rows, wrong)[key] == 0.0


def test_splits_differ_and_pairs_share_an_image():
    ev, cal = datasets.load_rows(DATA, "SynthBench_VQA"), datasets.load_rows(DATA, "SynthBench_VQA_calib")
    assert not {r["image"] for r in ev} & {r["image"] for r in cal}
    yn = datasets.load_rows(DATA, "SynthBench_YN")
    assert len(yn) == 120 and {r["category"] for r in yn} == {"color", "count", "position", "existence"}
    for a, b in zip(yn[::2], yn[1::2]):
        assert a["image"] == b["image"] and {a["answer"], b["answer"]} == {"Yes", "No"}
    assert synthbench.EVAL_SEED != synthbench.CALIB_SEED
