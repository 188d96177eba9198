import csv

from tests import main


def test_analysis_writes_tables_and_plots(tmp_path):
    out = tmp_path / "an"
    main("qwen2vl", ["--model_path", "tiny", "--rotate", "--rotate_llm", "--rotate_visual_clip", "--online_llm_hadamard",
                     "--online_visual_hadamard", "--quant", "--quant_llm", "--llm_static", "--nsamples", "2",
                     "--calib_num", "4", "--analysis", str(out), "--output_dir", str(tmp_path / "o")])
    act = list(csv.DictReader(open(out / "activation_ranges.csv")))
    layers = {r["layer"] for r in act}
    assert len(layers) == 14  # 7 linears x 2 LLM layers
    for layer in layers:
        mods = {r["modality"]: r for r in act if r["layer"] == layer}
        assert set(mods) == {"visual", "text"}
        for r in mods.values():
            lo, hi, p = float(r["min"]), float(r["max"]), float(r["p99.9_abs"])
            assert lo < 0 < hi and 0 < p <= max(-lo, hi) + 1e-6
    w = list(csv.DictReader(open(out / "rms_weights.csv")))
    assert {r["layer"] for r in w} == {"model.language_model.layers.0.mlp.down_proj",
                                       "model.language_model.layers.1.mlp.down_proj",
                                       "model.visual.blocks.0.mlp.fc2", "model.visual.blocks.1.mlp.fc2"}
    assert all(float(r["max_before"]) >= float(r["max_after"]) for r in w)
    assert (out / "activation_ranges.png").stat().st_size > 10_000
    assert len(list((out / "rms").glob("*.png"))) == 4
