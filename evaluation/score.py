"""Score a predictions file against a VLMEvalKit-format TSV:

    python -m evaluation.score <dataset_name> <dataset.tsv> <predictions.jsonl>

``predictions.jsonl`` has one ``{"index": ..., "prediction": "..."}`` per line (the format
``exam/quant_*.py`` writes); rows of the TSV without a prediction are left out. Prints the scores as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.datasets import load_rows  # noqa: E402
from evaluation.scorers import score  # noqa: E402


def read_predictions(path: str) -> dict[str, str]:
    preds = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            item = json.loads(line)
            if "_meta" in item:
                continue
            if "index" not in item or "prediction" not in item:
                raise ValueError(f"{path}:{n}: each line needs 'index' and 'prediction'")
            preds[str(item["index"])] = item["prediction"]
    return preds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset_name")
    ap.add_argument("tsv")
    ap.add_argument("predictions")
    args = ap.parse_args(argv)
    rows = load_rows(os.path.dirname(args.tsv) or ".", os.path.basename(args.tsv)[:-4]
                     if args.tsv.endswith(".tsv") else args.tsv)
    preds = read_predictions(args.predictions)
    scored = [r for r in rows if str(r["index"]) in preds]
    result = score(args.dataset_name, scored, [preds[str(r["index"])] for r in scored])
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
