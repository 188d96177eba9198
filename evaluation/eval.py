"""Answer a benchmark's rows with a (quantized) model, resumably, and score the answers.

Predictions go to ``<output_dir>/<dataset>_predictions.jsonl`` one line per row as soon as each is
generated; a rerun with the same settings skips the rows already there. Decoding is greedy, one row
at a time (batch size 1: the tiny and the real models alike).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from tqdm.auto import tqdm

from model.base import Sample

from .datasets import image_of
from .scorers import score

log = logging.getLogger("mquant")

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


def dataset_prompt(dataset_name: str, row: dict) -> str:
    """The dataset's own prompt, as VLMEvalKit builds it for models without a custom prompt:
    TextVQA / DocVQA (and SynthBench's one-word subsets) ask for a single word or phrase; OCRBench and
    MME use the bare question."""
    q = str(row["question"])
    if any(k in dataset_name for k in ("TextVQA", "DocVQA", "SynthBench_VQA", "SynthBench_OCR")):
        return q + VQA_SUFFIX
    return q


def run_hash(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_done(path: str, digest: str) -> dict[str, str]:
    done: dict[str, str] = {}
    if not os.path.isfile(path):
        return done
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or lines[0].get("_meta", {}).get("run") != digest:
        raise RuntimeError(
            f"{path} holds predictions of another run (other model or flags); use another --output_dir or delete the file"
        )
    for item in lines[1:]:
        done[str(item["index"])] = item["prediction"]
    return done


@torch.no_grad()
def evaluate(adapter, loaded, dataset_name: str, rows: list[dict], output_dir: str, device: str,
             max_new_tokens: int, run_meta: dict, data_root: str | None = None, answer=None) -> dict:
    """Answer ``rows`` greedily (resuming from ``output_dir``) and score them. ``answer(inputs, row)``, when given,
    replaces ``generate``: it returns the new token ids of one row (a list or a ``[1, n]`` tensor)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{dataset_name}_predictions.jsonl")
    digest = run_hash(run_meta)
    done = _read_done(path, digest)
    resumed = len(done)
    if resumed:
        log.info("resuming %s: %d of %d rows already answered", path, resumed, len(rows))
    new_file = not os.path.isfile(path)
    with open(path, "a") as f:
        if new_file:
            f.write(json.dumps({"_meta": {"run": digest, "dataset": dataset_name}}) + "\n")
        for row in tqdm(rows, desc=f"eval {dataset_name}", unit="row", disable=None):
            key = str(row["index"])
            if key in done:
                continue
            sample = Sample([image_of(row, data_root)], adapter.prompt(dataset_name, row), index=row["index"],
                            meta={"dataset": dataset_name})
            inputs = adapter.build_inputs(loaded, sample, device)
            if answer is None:
                out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                            **adapter.decoding(loaded))
                new = out[:, inputs["input_ids"].shape[1]:]
            else:
                new = answer(inputs, row)
                new = new if torch.is_tensor(new) else torch.tensor([new], dtype=torch.long)
            pred = adapter.decode(loaded, new).strip()
            done[key] = pred
            f.write(json.dumps({"index": row["index"], "prediction": pred}) + "\n")
            f.flush()
    preds = [done[str(r["index"])] for r in rows]
    return {"dataset": dataset_name, "scores": score(dataset_name, rows, preds), "predictions": preds,
            "rows_scored": len(rows),
            "rows_resumed": resumed, "predictions_file": path}
