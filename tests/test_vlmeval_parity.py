"""Our scorers against VLMEvalKit's own functions on the same predictions (skipped without vlmeval)."""
import pytest

vlmeval = pytest.importorskip("vlmeval")

from evaluation import scorers as S  # noqa: E402
from evaluation.datasets import load_rows  # noqa: E402

from .test_scorers import OCR_PRED  # noqa: E402

FIX = "tests/fixtures"


def test_textvqa_and_docvqa_match_vlmevalkit():
    import numpy as np
    from vlmeval.dataset.utils.vqa_eval import hit_calculate, process_line

    for name, preds, method in (("TextVQA_VAL", ["Nike.", "two", "stop", "3,000", "10.30", "don't"], "vqa_score"),
                                ("DocVQA_VAL", ["inv-2041", "Acme Corporation", "May 4 2020", "Jon Smyth", "1250", "Strase"],
                                 "anls")):
        rows = load_rows(FIX, name)
        res = [process_line({"answer": r["answer"], "prediction": p}, method=method) for r, p in zip(rows, preds)]
        theirs = float(np.mean(hit_calculate(res, name))) * 100
        assert S.score(name, rows, preds)["Overall"] == pytest.approx(theirs)


def test_mme_and_ocrbench_match_vlmevalkit(tmp_path):
    import pandas as pd
    from vlmeval.dataset.image_vqa import OCRBench
    from vlmeval.dataset.utils.yorn import MME_rating, YOrN_Extraction

    rows = load_rows(FIX, "MME")
    preds = ["Yes, it is red.", "No.", "yes", "Yes", "I think yes and no", "no", "Yes", "No", "Nope", "yes"]
    df = pd.DataFrame([{**r, "prediction": p} for r, p in zip(rows, preds)]).drop(columns=["image"])
    df["extracted"] = [YOrN_Extraction(p) for p in df["prediction"]]
    df["score"] = df["answer"] == df["extracted"]
    f = tmp_path / "mme.xlsx"
    df.to_excel(f, index=False)
    theirs = MME_rating(str(f)).iloc[0].to_dict()
    ours = S.score("MME", rows, preds)
    assert {k: pytest.approx(v) for k, v in ours.items()} == {k: theirs[k] for k in ours}

    rows = load_rows(FIX, "OCRBench")
    df = pd.DataFrame([{**r, "prediction": p} for r, p in zip(rows, OCR_PRED)]).drop(columns=["image"])
    f = tmp_path / "ocr.xlsx"
    df.to_excel(f, index=False)
    evaluate = OCRBench.evaluate  # a classmethod in current releases, an instance method in older ones
    theirs = evaluate(str(f)) if getattr(evaluate, "__self__", None) is OCRBench else evaluate(object.__new__(OCRBench), str(f))
    assert S.score("OCRBench", rows, OCR_PRED) == {k: theirs[k] for k in theirs}


def test_bridge_model_answers_through_vlmevalkit_base_model(tmp_path):
    import torch

    from evaluation.builtin import builtin_rows
    from evaluation.vlmeval_bridge import register, vlm_class
    from model import registry

    ad = registry.get("qwen2vl")
    loaded = ad.load("tiny", "cpu", torch.float32)
    model = vlm_class()(adapter=ad, loaded=loaded, device="cpu", max_new_tokens=3)
    path = tmp_path / "img.png"
    builtin_rows(1)[0]["image"].save(path)
    answer = model.generate([{"type": "image", "value": str(path)}, {"type": "text", "value": "What is it?"}],
                            dataset="OCRBench")
    assert isinstance(answer, str)
    register("MQuant-test", model)
    from vlmeval.config import supported_VLM

    assert supported_VLM["MQuant-test"]() is model
