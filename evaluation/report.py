"""Finished runs (their ``results.json``) as the rows of a table, in Markdown and CSV.

    python -m evaluation.report RUN_DIR... [--csv FILE] [--format markdown|csv] [--title TEXT]
                                [--all_keys] [--allow_mixed]

A RUN_DIR is the ``--output_dir`` of one run, or a folder above several (searched for ``results.json``). Each run
scored one benchmark; runs whose quantization settings are the same make one row, with a column per benchmark
score in VLMEvalKit's keys, the calibration rows each used, the wall time (summed over the row's runs), the peak
memory (the largest) and the machine. Rows come in the order the runs are given.

Numbers of different checkpoints, or of one benchmark calibrated on different rows (or scored on other rows, or
decoded otherwise), do not compare: such runs are refused with the difference named, unless ``--allow_mixed``.

Only the standard library is used, so a report is instant and needs no model code.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field

# The scores a paper table shows per benchmark (VLMEvalKit's keys); --all_keys shows every key.
HEADLINE = {
    "OCRBench": ("Final Score",),
    "TextVQA_VAL": ("Overall",),
    "DocVQA_VAL": ("Overall",),
    "MME": ("perception", "reasoning"),
}
BENCHMARK_ORDER = ("OCRBench", "TextVQA_VAL", "DocVQA_VAL", "MME")  # the paper's tables list them so

# Flags that say how or where a run ran, not which quantized model it made: left out of the "flags" column and
# of the row identity (the config, without its sample counts and seed, is the identity). The value is the number
# of arguments each takes.
RUN_FLAGS = {
    "--model_path": 1, "--data_root": 1, "--output_dir": 1, "--device": 1, "--dtype": 1, "--offload": 0,
    "--seed": 1, "--dataset_name": 1, "--calib_source": 1, "--eval_num": 1, "--max_new_tokens": 1,
    "--eval_backend": 1, "--nsamples": 1, "--calib_num": 1, "--holdout_num": 1, "--dump_gptq": 1,
    "--analysis": 1, "--load_gptq": 1,
}
PER_RUN_CONFIG = ("nsamples", "calib_num", "seed")  # recipe counts differ per benchmark within one setting


class ReportError(ValueError):
    """Runs that cannot be put in one table, or input that is not a run; the message says which and why."""


@dataclass
class Run:
    path: str  # the folder holding results.json
    results: dict

    @property
    def benchmark(self) -> str:
        return self.results["evaluation"]["dataset"]

    @property
    def scores(self) -> dict:
        return self.results["evaluation"]["scores"]

    @property
    def model(self) -> str:
        m = self.results["model"]
        return f"{m['adapter']} {m['model_path']!r}"

    @property
    def calibration(self) -> tuple:
        c = self.results["calibration"]
        return c["source"], c["seed"], tuple(str(i) for i in c.get("held_out_rows", []))

    @property
    def rows_scored(self) -> int:
        return self.results["evaluation"]["rows_scored"]

    @property
    def decoding(self) -> str:
        """How the answers were produced: decoding settings, length and scorer (they move the scores too)."""
        d = json.dumps(self.results.get("decoding") or {"num_beams": 1}, sort_keys=True)
        cmd = self.results.get("command", "")
        tokens = flag_value(cmd, "--max_new_tokens") or "the default"
        return f"{d}, max_new_tokens {tokens}, scorer {flag_value(cmd, '--eval_backend') or 'mquant'}"

    @property
    def setting_key(self) -> str:
        cfg = {k: v for k, v in self.results["config"].items() if k not in PER_RUN_CONFIG}
        return json.dumps([cfg, self.results["model"]["dtype"]], sort_keys=True)


def find_runs(paths: list[str]) -> list[Run]:
    runs: list[Run] = []
    for p in paths:
        files = []
        if os.path.isfile(p) and os.path.basename(p) == "results.json":
            files = [p]
        elif os.path.isfile(os.path.join(p, "results.json")):
            files = [os.path.join(p, "results.json")]
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                if "results.json" in names:
                    files.append(os.path.join(root, "results.json"))
        if not os.path.exists(p):
            raise ReportError(f"{p} does not exist: give the --output_dir of a finished run, or a folder above runs")
        if not files:
            raise ReportError(f"{p}: no results.json in it or below; give the --output_dir of a finished run "
                              "(results.json is written when a run ends, so an interrupted run has none yet)")
        for f in files:
            with open(f) as fh:
                try:
                    results = json.load(fh)
                except json.JSONDecodeError as e:
                    raise ReportError(f"{f} is not valid JSON ({e}); rerun that run to rewrite it") from None
            if not results.get("evaluation"):
                raise ReportError(f"{f}: the run scored no benchmark (it ran without --dataset_name), so it has no "
                                  "row to give; rerun it with --dataset_name")
            runs.append(Run(os.path.dirname(f) or ".", results))
    return runs


def defining_flags(command: str) -> list[str]:
    """The command's flags without the run-only ones (paths, counts, device): what makes the setting."""
    tokens = command.split()[1:]  # the first token is the exam script
    out, i = [], 0
    while i < len(tokens):
        flag = tokens[i].split("=", 1)[0]
        if flag in RUN_FLAGS:
            i += 1 + (0 if "=" in tokens[i] else RUN_FLAGS[flag])
            continue
        out.append(tokens[i])
        i += 1
    return out


def flag_value(command: str, flag: str) -> str | None:
    tokens = command.split()
    for i, t in enumerate(tokens):
        if t == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if t.startswith(flag + "="):
            return t.split("=", 1)[1]
    return None


def bits(part: dict) -> str:
    if not part["quantize"]:
        return "FP"
    w, a = part["weight"]["bits"], part["act"]["bits"]
    return f"W{w}A{a}" if w < 16 or a < 16 else "FP"


def setting_name(cfg: dict, dtype: str) -> str:
    """A name that follows from the settings alone, so it cannot disagree with the numbers beside it."""
    parts = [cfg[p] for p in ("visual", "llm") if cfg[p]["quantize"]]
    rotated = cfg["rotation"]["rotate"]
    if not parts:
        return f"FP ({dtype}, rotated)" if rotated else f"FP ({dtype})"
    rtn = {p["weight"]["rtn"] for p in parts}
    weights = "RTN" if rtn == {True} else "GPTQ" if rtn == {False} else "GPTQ (vision or LLM RTN)"
    method = f"rotation + {weights}" if rotated else weights
    static = {p["name"]: p["act"]["static"] for p in parts}
    if not any(static.values()):
        per = "per-tensor" if any(p["act"]["per_tensor"] for p in parts) else "per-token"
        return f"{method}, dynamic {per}"
    acts = "static" if all(static.values()) else " / ".join(
        f"{'static' if s else 'dynamic'} {'vision' if n == 'visual' else 'LLM'}" for n, s in static.items())
    steps = []
    if static.get("llm"):
        steps.append("MSQ" if cfg["msq"] else "one scale")
    if cfg["aifs"]:
        steps.append("AIFS")
    if cfg["rms"]["visual"] or cfg["rms"]["llm"]:
        steps.append("RMS")
    sink = " + sink scale" if cfg.get("sink_scale") else ""
    if steps == ["MSQ", "AIFS", "RMS"] and method == "rotation + GPTQ" and acts == "static":
        return f"MQuant (MSQ + AIFS + RMS){sink}"
    return f"{method}, {acts}" + (", " + " + ".join(steps) if steps else "") + sink


def calibration_used(r: dict) -> tuple[int, int]:
    """(GPTQ rows, static-scale rows) the run actually calibrated on; rows it was handed but did not use count 0."""
    cfg = r["config"]
    parts = [cfg[p] for p in ("visual", "llm") if cfg[p]["quantize"]]
    gptq = any(not p["weight"]["rtn"] and p["weight"]["bits"] < 16 for p in parts)
    static = any(p["act"]["static"] for p in parts)
    cal = r["calibration"]
    return (len(cal.get("gptq_rows", [])) if gptq else 0), (len(cal.get("static_rows", [])) if static else 0)


def machine(r: dict) -> str:
    m = r.get("environment", {}).get("machine")
    if not m:
        return "not recorded"
    cpu = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores" + (f", {' '.join(m['isa'])}" if m.get("isa") else "")
    device = r["model"].get("device", "cpu")
    if device.startswith("cuda") and m.get("gpus"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return f"{m['gpus'][min(index, len(m['gpus']) - 1)]} ({cpu})"
    return cpu


def check_comparable(runs: list[Run], allow_mixed: bool) -> None:
    problems = []
    models: dict[str, list[str]] = {}
    for r in runs:
        models.setdefault(r.model, []).append(r.path)
    if len(models) > 1 and not allow_mixed:
        listed = "; ".join(f"{m} ({', '.join(paths)})" for m, paths in models.items())
        problems.append(f"the runs use different model checkpoints: {listed}. A table compares settings of one "
                        "checkpoint: report each checkpoint's runs separately")
    by_bench: dict[str, list[Run]] = {}
    for r in runs:
        by_bench.setdefault(r.benchmark, []).append(r)
    for bench, rs in by_bench.items():
        first = rs[0]
        for other in rs[1:]:
            if other.calibration != first.calibration and not allow_mixed:
                problems.append(f"{bench}: {first.path} and {other.path} calibrate on different rows "
                                f"({_calibration_difference(first, other)}); settings in one table must hold out the "
                                "same rows, so that they are also scored on the same rows: run them with the same "
                                "--seed, --calib_source and --holdout_num")
            elif other.rows_scored != first.rows_scored and not allow_mixed:
                problems.append(f"{bench}: {first.path} scored {first.rows_scored} rows but {other.path} scored "
                                f"{other.rows_scored}: run them with the same --eval_num")
            elif other.decoding != first.decoding and not allow_mixed:
                problems.append(f"{bench}: {first.path} answered with {first.decoding} but {other.path} with "
                                f"{other.decoding}: run them with the same --max_new_tokens, --greedy and "
                                "--eval_backend")
    cells: dict[tuple, str] = {}
    for r in runs:
        key = (row_key(r, allow_mixed), r.benchmark)
        if key in cells:
            problems.append(f"{cells[key]} and {r.path} are the same setting on {r.benchmark}, and one cell takes one "
                            "run: give only one of them")
        cells.setdefault(key, r.path)
    if problems:
        hint = "" if allow_mixed else ("\n(--allow_mixed puts different checkpoints, calibration or scored rows and "
                                       "decoding in one table anyway)")
        raise ReportError("these runs do not make one table:\n  - " + "\n  - ".join(problems) + hint)


def _calibration_difference(a: Run, b: Run) -> str:
    (sa, ea, ra), (sb, eb, rb) = a.calibration, b.calibration
    diffs = []
    if sa != sb:
        diffs.append(f"source {sa} vs {sb}")
    if ea != eb:
        diffs.append(f"seed {ea} vs {eb}")
    if len(ra) != len(rb):
        diffs.append(f"{len(ra)} vs {len(rb)} held-out rows")
    only_a, only_b = [i for i in ra if i not in set(rb)], [i for i in rb if i not in set(ra)]
    if only_a or only_b:
        diffs.append(f"rows only in the first: {_few(only_a)}; only in the second: {_few(only_b)}")
    return ", ".join(diffs)


def _few(items: list[str], n: int = 5) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def row_key(r: Run, allow_mixed: bool) -> str:
    return r.setting_key + (r.model if allow_mixed else "")


@dataclass
class Row:
    runs: list[Run] = field(default_factory=list)

    @property
    def first(self) -> dict:
        return self.runs[0].results

    def run_for(self, bench: str) -> Run | None:
        return next((r for r in self.runs if r.benchmark == bench), None)


@dataclass
class Table:
    rows: list[Row]
    benchmarks: list[str]
    score_keys: dict[str, list[str]]
    mixed_models: bool


def build_table(runs: list[Run], all_keys: bool = False, allow_mixed: bool = False) -> Table:
    check_comparable(runs, allow_mixed)
    rows: dict[str, Row] = {}
    for r in runs:
        rows.setdefault(row_key(r, allow_mixed), Row()).runs.append(r)
    present = {r.benchmark for r in runs}
    benchmarks = [b for b in BENCHMARK_ORDER if b in present] + sorted(present - set(BENCHMARK_ORDER))
    keys: dict[str, list[str]] = {}
    for b in benchmarks:
        seen: list[str] = []
        for r in runs:
            if r.benchmark == b:
                seen += [k for k in r.scores if k not in seen]
        headline = [k for k in HEADLINE.get(b, ("Overall",)) if k in seen]
        keys[b] = seen if all_keys or not headline else headline
    return Table(list(rows.values()), benchmarks, keys, len({r.model for r in runs}) > 1)


def _score(v, markdown: bool) -> str:
    if v is None:
        return "-" if markdown else ""
    if isinstance(v, float) and markdown:
        return f"{v:.2f}"
    return str(v)


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _row_values(t: Table, row: Row, markdown: bool) -> dict[str, str]:
    cfg, model = row.first["config"], row.first["model"]
    out = {"setting": setting_name(cfg, model["dtype"]), "vision": bits(cfg["visual"]), "LLM": bits(cfg["llm"])}
    if t.mixed_models:
        out["model"] = row.runs[0].model
    for b in t.benchmarks:
        run = row.run_for(b)
        for k in t.score_keys[b]:
            out[f"{b} ({k})" if markdown else f"{b} {k}"] = _score(run.scores.get(k) if run else None, markdown)
    sources = sorted({f"{r.calibration[0]} (seed {r.calibration[1]})" for r in row.runs})
    counts = []
    for b in t.benchmarks:
        run = row.run_for(b)
        if run is not None:
            g, s = calibration_used(run.results)
            counts.append(f"{b} {g}/{s}")
    used = any(calibration_used(r.results) != (0, 0) for r in row.runs)
    out["calibration (GPTQ/static rows)"] = f"{', '.join(sources)}: {', '.join(counts) if used else 'none used'}"
    wall = sum(r.results["total_seconds"] for r in row.runs)
    rss = max(r.results["memory"]["peak_rss_mb"] for r in row.runs)
    cuda = [r.results["memory"]["peak_cuda_mb"] for r in row.runs if "peak_cuda_mb" in r.results["memory"]]
    machines = "; ".join(dict.fromkeys(machine(r.results) for r in row.runs))
    flags = " ".join(defining_flags(row.first["command"]))
    if markdown:
        out["wall time"] = _seconds(wall)
        out["peak memory"] = (f"CUDA {max(cuda) / 1024:.1f} GB, " if cuda else "") + f"RSS {rss / 1024:.1f} GB"
        out["machine"] = machines
        out["flags"] = f"`{flags}`" if flags else "(none)"
    else:
        out.update({"flags": flags, "wall_seconds": f"{wall:.1f}", "peak_rss_mb": f"{rss:.0f}",
                    "peak_cuda_mb": f"{max(cuda):.0f}" if cuda else "", "machine": machines,
                    "device": model["device"], "dtype": model["dtype"],
                    "runs": " ".join(r.path for r in row.runs)})
    return out


def to_markdown(t: Table, title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    models = dict.fromkeys(r.model for row in t.rows for r in row.runs)
    if not t.mixed_models:
        lines += [f"Model: {next(iter(models))}.", ""]
    values = [_row_values(t, row, True) for row in t.rows]
    header = list(values[0])
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for v in values:
        lines.append("| " + " | ".join(v[h].replace("|", "\\|") for h in header) + " |")
    lines.append("")
    for b in t.benchmarks:
        runs = [r for row in t.rows for r in row.runs if r.benchmark == b]
        source, seed, held = runs[0].calibration
        where = "held out of the benchmark" if source == "heldout" else f"drawn from {source}"
        line = (f"{b}: {runs[0].rows_scored} rows scored; calibration rows {where} (seed {seed}, {len(held)} rows), "
                "never scored.")
        if len({(r.calibration, r.rows_scored, r.decoding) for r in runs}) > 1:
            line += " Not all runs share these rows or their decoding (--allow_mixed): see each run's results.json."
        lines.append(line)
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    values = [_row_values(t, row, False) for row in t.rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(values[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(values)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's --output_dir, or a folder above several runs")
    ap.add_argument("--format", choices=["markdown", "csv"], default="markdown",
                    help="what to print (default Markdown)")
    ap.add_argument("--csv", metavar="FILE", help="also write the rows as CSV to FILE")
    ap.add_argument("--title", help="a heading above the Markdown table")
    ap.add_argument("--all_keys", action="store_true", help="every score key, not only the headline ones")
    ap.add_argument("--allow_mixed", action="store_true",
                    help="put runs of different checkpoints, calibration rows, scored rows or decoding in one table "
                         "anyway")
    args = ap.parse_args(argv)
    try:
        table = build_table(find_runs(args.runs), args.all_keys, args.allow_mixed)
    except ReportError as e:
        print(f"{ap.prog}: {e}", file=sys.stderr)
        return 2
    if args.csv:
        with open(args.csv, "w") as f:
            f.write(to_csv(table))
    print(to_markdown(table, args.title) if args.format == "markdown" else to_csv(table), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
