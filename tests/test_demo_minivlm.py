"""`make demo` end to end on a few rows (slow: needs the converted MiniVLM; `make test-slow` installs its sources)."""
import importlib.util
import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_summary(tmp_path_factory):
    convert = pytest.importorskip("model.minivlm.convert")
    for pkg in (convert.LM_PACKAGE, convert.VIT_PACKAGE):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg} is not installed: `make test-slow` installs it")
    convert.convert_all()
    from exam import demo_minivlm

    out = tmp_path_factory.mktemp("demo")
    summary = demo_minivlm.main(["--eval_num", "4", "--kl_rows", "1", "--n_boot", "20", "--only", "W8A8",
                                 "--nsamples", "2", "--calib_num", "4", "--output_dir", str(out)])
    return summary, json.loads((out / "summary.json").read_text())


def test_summary_records_machine_intervals_and_kl(demo_summary):
    summary, on_disk = demo_summary
    assert on_disk == json.loads(json.dumps(summary))
    m = on_disk["machine"]
    assert {"cpu", "isa", "threads", "torch", "torch_build"} <= set(m) and m["threads"] >= 1
    settings = on_disk["settings"]
    assert list(settings) == ["FP32", "W8A8 MQuant (static)"]
    fp, q = settings["FP32"], settings["W8A8 MQuant (static)"]
    assert fp["kl"] == 0.0 and q["kl"] > 0.0
    assert set(fp["scores"]) == {"SynthBench_OCR", "SynthBench_VQA", "SynthBench_YN", "mean"}
    for name, u in fp["scores"].items():
        assert u["low"] <= u["score"] <= u["high"]
        assert u["agreement"] is None and u["diff"] is None  # FP32 is the reference
    for name, u in q["scores"].items():
        assert u["low"] <= u["score"] <= u["high"] and 0.0 <= u["agreement"] <= 100.0
        assert u["diff"] == pytest.approx(u["score"] - fp["scores"][name]["score"], abs=2e-3)  # each stored to 3 decimals
        assert u["diff_low"] <= u["diff"] <= u["diff_high"]


def test_prefill_column_times_fp32_and_the_realized_model(demo_summary):
    _, on_disk = demo_summary
    fp, q = on_disk["settings"]["FP32"], on_disk["settings"]["W8A8 MQuant (static)"]
    assert fp["prefill_prompts"] == q["prefill_prompts"] == 6  # 2 prompts per subset by default
    assert fp["prefill_seconds"] > 0 and fp["prefill_int8"] is None
    assert q["prefill_seconds"] > 0 and q["prefill_int8"] in ("onednn", "fbgemm")
