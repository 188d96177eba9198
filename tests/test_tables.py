"""The paper's table scripts on tiny models (MODEL=tiny DATA=tests/fixtures) and ``python -m evaluation.report``.

One scenario runs the scripts once each (module fixture): the main table, the main table again, the ablation
(which shares the MQuant run with the main table), then an interrupted FP evaluation resumed. The tests read what
that scenario left behind.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from evaluation import report
from tests import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE = "float32" if DEVICE == "cpu" else "bfloat16"
HERMETIC = ("MODEL", "DATA", "OUT", "SETTINGS", "BENCHMARKS", "EVAL_NUM", "MAX_NEW_TOKENS", "EXTRA_FLAGS", "DRY_RUN",
            "LMUData")
MQUANT_FLAGS = ("--rotate --rotate_visual_clip --rotate_visual_cross_attn --rotate_llm --online_llm_hadamard "
                "--online_visual_hadamard --quant --quant_llm --quant_visual_clip --quant_cross_attention "
                "--visual_w_bits 4 --visual_a_bits 8 --llm_w_bits 4 --llm_a_bits 8 --visual_w_clip --llm_w_clip "
                "--act_order --visual_static --llm_static --aifs --visual_split")
RTN_FLAGS = ("--quant --quant_llm --quant_visual_clip --quant_cross_attention --visual_w_bits 4 --visual_a_bits 8 "
             "--llm_w_bits 4 --llm_a_bits 8 --visual_w_rtn --llm_w_rtn")


def script(name: str, *args: str, root: str = ROOT, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in HERMETIC and not k.startswith("CALIB_SOURCE_")}
    base.update({"PYTHON": sys.executable, "DATA": "tests/fixtures", "EXTRA_FLAGS": f"--device {DEVICE}", **env})
    return subprocess.run(["bash", os.path.join(root, "scripts", name), *args], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=900)


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def results(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("tables"))
    root = os.path.join(out, "qwen2vl-tiny")
    tiny = {"MODEL": "tiny", "OUT": out}
    s: dict = {"out": out, "root": root}
    s["main"] = script("table_main.sh", "qwen2vl", **tiny)
    assert s["main"].returncode == 0, (s["main"].stdout + s["main"].stderr)[-3000:]
    s["main_md"] = open(os.path.join(root, "table_main.md")).read()
    s["main_csv"] = open(os.path.join(root, "table_main.csv")).read()
    s["again"] = script("table_main.sh", "qwen2vl", **tiny)
    s["again_md"] = open(os.path.join(root, "table_main.md")).read()
    s["again_csv"] = open(os.path.join(root, "table_main.csv")).read()
    s["ablation"] = script("table_ablation.sh", "qwen2vl", **tiny)
    assert s["ablation"].returncode == 0, (s["ablation"].stdout + s["ablation"].stderr)[-3000:]
    s["ablation_csv"] = open(os.path.join(root, "table_ablation.csv")).read()

    # an evaluation stopped after its first answer: no results.json, one prediction on disk
    fp = os.path.join(root, "fp", "MME")
    s["fp_before"] = results(fp)
    os.remove(os.path.join(fp, "results.json"))
    preds = os.path.join(fp, "MME_predictions.jsonl")
    with open(preds) as f:
        lines = f.readlines()
    with open(preds, "w") as f:
        f.writelines(lines[:2])
    s["resume"] = script("table_main.sh", "qwen2vl", SETTINGS="fp", BENCHMARKS="OCRBench MME", **tiny)
    assert s["resume"].returncode == 0, (s["resume"].stdout + s["resume"].stderr)[-3000:]
    s["resume_md"] = open(os.path.join(root, "table_main.md")).read()
    return s


def test_main_table_has_a_row_per_setting_with_the_runs_numbers(scenario):
    root = scenario["root"]
    rows = csv_rows(scenario["main_csv"])
    runs = [results(os.path.join(root, s, "MME")) for s in ("fp", "v4_rtn", "v4_mquant")]
    runs[0] = scenario["fp_before"]
    assert [r["setting"] for r in rows] == [f"FP ({DTYPE})", "RTN, dynamic per-token", "MQuant (MSQ + AIFS + RMS)"]
    assert [(r["vision"], r["LLM"]) for r in rows] == [("FP", "FP"), ("W4A8", "W4A8"), ("W4A8", "W4A8")]
    assert [r["flags"] for r in rows] == ["", RTN_FLAGS, MQUANT_FLAGS]
    assert list(rows[0])[3:5] == ["MME perception", "MME reasoning"]
    for row, run in zip(rows, runs):
        assert row["MME perception"] == str(run["evaluation"]["scores"]["perception"])
        assert row["MME reasoning"] == str(run["evaluation"]["scores"]["reasoning"])
        assert row["wall_seconds"] == f"{run['total_seconds']:.1f}"
        assert row["peak_rss_mb"] == f"{run['memory']['peak_rss_mb']:.0f}"
        assert row["machine"] == report.machine(run) and str(os.cpu_count()) + " cores" in row["machine"]
        assert (row["device"], row["dtype"]) == (DEVICE, DTYPE)
    # one GPTQ row and three static rows, but every setting held out (and so scored) the same rows: two MME
    # question pairs, where the FP run alone would have held out one
    assert [r["calibration (GPTQ/static rows)"] for r in rows] == [
        "heldout (seed 42): none used", "heldout (seed 42): none used", "heldout (seed 42): MME 1/3"]
    held = {tuple(r["calibration"]["held_out_rows"]) for r in runs}
    assert len(held) == 1 and len(next(iter(held))) == 4 and len(runs[0]["calibration"]["gptq_rows"]) == 1
    assert "MME: 2 rows scored; calibration rows held out of the benchmark (seed 42, 4 rows), never scored." in \
        scenario["main_md"]
    assert "| MQuant (MSQ + AIFS + RMS) | W4A8 | W4A8 |" in scenario["main_md"]


def test_second_run_skips_every_finished_run_and_gives_the_same_table(scenario):
    out = scenario["again"].stdout
    assert scenario["again"].returncode == 0
    for s in ("fp", "v4_rtn", "v4_mquant"):
        assert f"skip    {s}/MME: finished" in out
    assert "run     " not in out and not re.search(r"^\+ ", out, re.M)  # no command was started
    assert scenario["again_md"] == scenario["main_md"] and scenario["again_csv"] == scenario["main_csv"]


def test_ablation_adds_one_step_per_row_and_reuses_the_main_tables_run(scenario):
    out = scenario["ablation"].stdout
    assert "run     v4_static/MME" in out and "run     v4_mquant_sink/MME" in out
    assert "skip    v4_mquant/MME: finished" in out
    rows = csv_rows(scenario["ablation_csv"])
    assert [r["setting"] for r in rows] == ["rotation + GPTQ, static, one scale", "MQuant (MSQ + AIFS + RMS)",
                                            "MQuant (MSQ + AIFS + RMS) + sink scale"]
    base = MQUANT_FLAGS.replace(" --aifs --visual_split", "")
    assert [r["flags"] for r in rows] == [base + " --no_msq", MQUANT_FLAGS, MQUANT_FLAGS + " --sink_scale"]
    assert rows[1] == csv_rows(scenario["main_csv"])[2]


def test_interrupted_evaluation_resumes_from_its_predictions(scenario):
    out = scenario["resume"].stdout
    assert "resume  fp/MME: 1 predictions on disk" in out and "run     fp/OCRBench" in out
    assert "resuming" in out and "1 of 2 rows already answered" in out
    after = results(os.path.join(scenario["root"], "fp", "MME"))
    assert after["evaluation"]["rows_resumed"] == 1
    assert after["evaluation"]["scores"] == scenario["fp_before"]["evaluation"]["scores"]
    # the resumed run and a new benchmark make one row with both benchmarks' columns
    md = scenario["resume_md"]
    assert "| setting | vision | LLM | OCRBench (Final Score) | MME (perception) | MME (reasoning) |" in md
    assert "OCRBench: 2 rows scored; calibration rows held out of the benchmark (seed 42, 3 rows), never scored." in md


def test_results_record_the_machine(scenario):
    m = results(os.path.join(scenario["root"], "v4_mquant", "MME"))["environment"]["machine"]
    assert m["cores"] == os.cpu_count() and m["cpu"] and m["cpu_capability"]
    from exam.common import ISA_FLAGS

    assert set(m.get("isa", [])) <= set(ISA_FLAGS)


# -- the report on its own ------------------------------------------------------------------------------------------
def copy_run(src: str, dst: str, edit=None) -> str:
    os.makedirs(dst)
    r = results(src)
    if edit:
        edit(r)
    with open(os.path.join(dst, "results.json"), "w") as f:
        json.dump(r, f)
    return dst


def test_report_refuses_runs_calibrated_on_other_rows_and_names_them(scenario, tmp_path, capsys):
    root = scenario["root"]
    fp = copy_run(os.path.join(root, "v4_rtn", "MME"), str(tmp_path / "a"))

    def other_rows(r):
        r["calibration"]["held_out_rows"] = ["999", *r["calibration"]["held_out_rows"][1:]]
        r["calibration"]["seed"] = 7
    mq = copy_run(os.path.join(root, "v4_mquant", "MME"), str(tmp_path / "b"), other_rows)
    assert report.main([fp, mq]) == 2
    err = capsys.readouterr().err
    first = results(fp)["calibration"]["held_out_rows"][0]
    assert f"MME: {fp} and {mq} calibrate on different rows (seed 42 vs 7, rows only in the first: {first}; " \
           "only in the second: 999)" in err
    assert "--allow_mixed" in err
    assert report.main([fp, mq, "--allow_mixed", "--format", "csv"]) == 0
    assert [r["setting"] for r in csv_rows(capsys.readouterr().out)] == ["RTN, dynamic per-token",
                                                                          "MQuant (MSQ + AIFS + RMS)"]


def test_report_refuses_other_checkpoints_scored_rows_and_decoding(scenario, tmp_path, capsys):
    root = scenario["root"]
    a = copy_run(os.path.join(root, "v4_rtn", "MME"), str(tmp_path / "a"))
    b = copy_run(os.path.join(root, "v4_mquant", "MME"), str(tmp_path / "b"),
                 lambda r: r["model"].update(model_path="weights/Qwen2-VL-2B-Instruct"))
    assert report.main([a, b]) == 2
    err = capsys.readouterr().err
    assert f"different model checkpoints: qwen2vl 'tiny' ({a}); qwen2vl 'weights/Qwen2-VL-2B-Instruct' ({b})" in err
    assert report.main([a, b, "--allow_mixed", "--format", "csv"]) == 0
    assert [r["model"] for r in csv_rows(capsys.readouterr().out)] == ["qwen2vl 'tiny'",
                                                                       "qwen2vl 'weights/Qwen2-VL-2B-Instruct'"]
    c = copy_run(os.path.join(root, "v4_mquant", "MME"), str(tmp_path / "c"),
                 lambda r: r["evaluation"].update(rows_scored=7))
    assert report.main([a, c]) == 2
    assert f"MME: {a} scored 2 rows but {c} scored 7: run them with the same --eval_num" in capsys.readouterr().err
    d = copy_run(os.path.join(root, "v4_mquant", "MME"), str(tmp_path / "d"),
                 lambda r: r.update(command=r["command"].replace("--max_new_tokens 2", "--max_new_tokens 5")))
    assert report.main([a, d]) == 2
    assert (f'{a} answered with {{"num_beams": 1}}, max_new_tokens 2, scorer mquant but {d} with {{"num_beams": 1}}, '
            "max_new_tokens 5, scorer mquant: run them with the same --max_new_tokens") in capsys.readouterr().err


def test_report_puts_each_score_in_its_runs_cell(scenario, tmp_path, capsys):
    root = scenario["root"]
    runs = []
    for i, s in enumerate(("fp", "v4_rtn", "v4_mquant")):
        def distinct(r, i=i):
            r["evaluation"]["scores"].update(perception=100.0 + i, reasoning=50 + i)
        runs.append(copy_run(os.path.join(root, s, "MME"), str(tmp_path / s), distinct))
    assert report.main([str(tmp_path)]) == 0  # a folder above the runs: found in path order
    md = capsys.readouterr().out
    lines = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[3:5] for line in lines] == [["100.00", "50"], ["102.00", "52"], ["101.00", "51"]]
    assert [line.split(" | ")[0] for line in lines] == [f"| FP ({DTYPE})", "| MQuant (MSQ + AIFS + RMS)",
                                                          "| RTN, dynamic per-token"]


def test_report_refuses_duplicates_unscored_runs_and_empty_folders(scenario, tmp_path, capsys):
    src = os.path.join(scenario["root"], "v4_mquant", "MME")
    a, b = copy_run(src, str(tmp_path / "a")), copy_run(src, str(tmp_path / "b"))
    assert report.main([a, b]) == 2
    assert f"{a} and {b} are the same setting on MME, and one cell takes one run" in capsys.readouterr().err
    c = copy_run(src, str(tmp_path / "c"), lambda r: r.update(evaluation=None))
    assert report.main([c]) == 2
    assert "the run scored no benchmark (it ran without --dataset_name)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no results.json in it or below" in capsys.readouterr().err
    assert report.main([str(tmp_path / "absent")]) == 2
    assert f"{tmp_path / 'absent'} does not exist" in capsys.readouterr().err


# -- the plan of the full tables, and bad input ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory) -> str:
    """A folder that passes for a Qwen2-VL checkpoint up to the point where weights would be read."""
    path = tmp_path_factory.mktemp("Qwen2-VL-7B-Instruct")
    (path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    return str(path)


@pytest.fixture(scope="module")
def plans(fake_checkpoint) -> dict[str, list[list[str]]]:
    """Every command of the full tables on a real-looking checkpoint (DRY_RUN: printed, not run)."""
    out = {}
    for name in ("table_main.sh", "table_ablation.sh"):
        r = script(name, "qwen2vl", fake_checkpoint, DRY_RUN="1", OUT="outputs/plan", EXTRA_FLAGS="",
                   CALIB_SOURCE_TextVQA_VAL="tests/fixtures/OCRBench.tsv")
        assert r.returncode == 0, r.stderr
        out[name] = [line.split() for line in r.stdout.splitlines()]
    assert not os.path.exists(os.path.join(ROOT, "outputs", "plan"))  # a dry run writes nothing
    return out


def value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_full_tables_use_the_reference_recipes(plans, fake_checkpoint):
    main, ablation = plans["table_main.sh"], plans["table_ablation.sh"]
    assert len(main) == 11 * 4 and len(ablation) == 5 * 4
    counts = {"OCRBench": ("128", "128", "128"), "TextVQA_VAL": ("128", "256", "256"),
              "DocVQA_VAL": ("128", "256", "256"), "MME": ("256", "512", "512")}
    for cmd in main + ablation:
        assert cmd[:4] == ["[new]", "exam/quant_qwen2vl.py", "--model_path", fake_checkpoint]
        bench = value(cmd, "--dataset_name")
        assert (value(cmd, "--nsamples"), value(cmd, "--calib_num"), value(cmd, "--holdout_num")) == counts[bench]
        assert "--eval_num" not in cmd and "--max_new_tokens" not in cmd
        # CALIB_SOURCE_<benchmark> calibrates that benchmark on another TSV; the others hold rows out
        assert (value(cmd, "--calib_source") if "--calib_source" in cmd else None) == \
            ("tests/fixtures/OCRBench.tsv" if bench == "TextVQA_VAL" else None)
        setting = value(cmd, "--output_dir").split("/")[-2]
        folder = f"outputs/plan/qwen2vl-{os.path.basename(fake_checkpoint)}/{setting}/{bench}"
        assert value(cmd, "--output_dir") == folder
    dirs = [value(c, "--output_dir") for c in main]
    assert len(set(dirs)) == len(dirs)
    shared = {value(c, "--output_dir"): c for c in main}
    for cmd in ablation:  # the ablation's baseline and MQuant runs are the main table's
        d = value(cmd, "--output_dir")
        if d.split("/")[-2] in ("v4_static", "v4_mquant"):
            assert shared[d] == cmd


def test_setting_names_follow_from_the_flags(plans):
    from exam.common import build_parser, check_args, config_from_args

    expected = {
        "fp": f"FP ({DTYPE})", "v8_rtn": "RTN, dynamic per-token", "v8_gptq": "GPTQ, dynamic per-token",
        "v8_dynamic": "rotation + GPTQ, dynamic per-token", "v8_static": "rotation + GPTQ, static, one scale",
        "v8_mquant": "MQuant (MSQ + AIFS + RMS)", "v4_msq": "rotation + GPTQ, static, MSQ",
        "v4_msq_aifs": "rotation + GPTQ, static, MSQ + AIFS",
        "v4_mquant_sink": "MQuant (MSQ + AIFS + RMS) + sink scale",
    }
    seen = {}
    for cmd in plans["table_main.sh"] + plans["table_ablation.sh"]:
        setting = value(cmd, "--output_dir").split("/")[-2]
        args = build_parser("qwen2vl").parse_args(cmd[2:])
        cfg = config_from_args(args)
        cfg.validate()
        assert check_args(args, cfg) == []
        seen[setting] = (report.setting_name(cfg.to_dict(), DTYPE), report.bits(cfg.to_dict()["visual"]))
    assert set(seen) == {"fp", "v8_rtn", "v8_gptq", "v8_dynamic", "v8_static", "v8_mquant", "v4_rtn", "v4_gptq",
                         "v4_dynamic", "v4_static", "v4_mquant", "v4_msq", "v4_msq_aifs", "v4_mquant_sink"}
    for setting, (name, vision) in seen.items():
        assert name == expected.get(setting, expected.get(setting.replace("v4", "v8")))
        assert vision == {"fp": "FP", "v8": "W8A8", "v4": "W4A8"}[setting[:2]]
    args = build_parser("qwen2vl").parse_args("--dataset_name MME --quant --quant_llm --llm_static --nsamples 2 "
                                               "--calib_num 4 --holdout_num 3".split())
    assert check_args(args, config_from_args(args)) == [
        "--holdout_num 3 is less than the 4 calibration rows --nsamples/--calib_num ask for: raise it or lower them"]


def test_bad_input_fails_before_any_run_naming_the_fix(tmp_path, fake_checkpoint):
    r = script("table_main.sh", "qwen3vl", MODEL="tiny")
    assert r.returncode == 2 and "unknown family 'qwen3vl': give one of qwen2vl qwenvl internvl2 llava" in r.stderr
    r = script("table_ablation.sh", "qwen2vl", MODEL="tiny", DATA=str(tmp_path))
    assert r.returncode == 2
    assert f"benchmark file(s) not found: {tmp_path}/MME.tsv. Put VLMEvalKit's TSVs there" in r.stderr
    assert "set DATA=FOLDER" in r.stderr
    r = script("table_main.sh", "qwen2vl", MODEL="tiny", CALIB_SOURCE_MME="MME_train")
    assert r.returncode == 2
    assert "CALIB_SOURCE_MME=MME_train: neither MME_train nor tests/fixtures/MME_train.tsv exists" in r.stderr
    r = script("table_main.sh", "qwen2vl", MODEL="tiny", SETTINGS="fp v9_magic")
    assert r.returncode == 2 and "unknown setting 'v9_magic' for this table: give some of: fp v8_rtn" in r.stderr
    r = script("table_main.sh", "llava")
    assert r.returncode == 2 and "the llava family has no default checkpoint folder: pass CHECKPOINT_FOLDER" in r.stderr
    r = script("table_main.sh", "qwen2vl", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and f"checkpoint folder {tmp_path}/nowhere does not exist" in r.stderr
    r = script("table_main.sh", "llava", fake_checkpoint)
    assert r.returncode == 2
    assert "unsupported architecture ['Qwen2VLForConditionalGeneration']" in r.stderr
    assert "it is served by the 'qwen2vl' family" in r.stderr and "pass a llava checkpoint folder" in r.stderr
    assert r.stdout == ""  # nothing ran


def test_a_family_without_its_exam_script_fails_clearly(tmp_path):
    # a checkout where the family's exam script has not landed yet
    shutil.copytree(os.path.join(ROOT, "scripts"), tmp_path / "scripts")
    (tmp_path / "exam").mkdir()
    r = script("table_main.sh", "glm4v", root=str(tmp_path), MODEL="tiny")
    assert r.returncode == 2
    assert "the glm4v family's exam script exam/quant_glm4v.py is not in this checkout yet" in r.stderr


def test_latency_table_refuses_families_bench_ttft_does_not_model():
    r = script("table_latency.sh", "qwenvl", MODEL="tiny")
    assert r.returncode == 3 and r.stdout == ""
    assert "bench/ttft.py times random-weight Qwen2-VL language-model stacks" in r.stderr and "qwenvl" in r.stderr
    r = script("table_latency.sh", "nonesuch")
    assert r.returncode == 2 and "unknown family 'nonesuch'" in r.stderr


@pytest.mark.slow
def test_latency_table_runs_bench_ttft_on_a_small_stack(tmp_path):
    """About a minute on 2 cores: one 2B-wide layer, 256 visual tokens, one round."""
    r = script("table_latency.sh", "qwen2vl", MODEL="tiny", OUT=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "qwen2vl-tiny" / "table_latency.md").read_text()
    for row in ("| FP32 |", "| BF16 |", "| W8A8 dynamic per-token |", "| W8A8 static, one scale |"):
        assert row in table
    assert (tmp_path / "qwen2vl-tiny" / "table_latency.json").is_file()
