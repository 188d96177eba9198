"""Benchmark datasets in VLMEvalKit's TSV format, read offline from ``<data_root>/<name>.tsv``.

Columns: ``index``, ``image`` (base64; a short value instead names the ``index`` of the row whose
image it shares, as MME does for its question pairs), optional ``image_path``, ``question``,
``answer`` (OCRBench / TextVQA / DocVQA store a Python list literal), ``category`` and optional
``hint`` / ``split``. Nothing is downloaded: a missing file is an error that says where to put it.

Calibration rows are never scored: :func:`split_rows` either takes them from a different TSV or
holds out a seeded part of the same file (whole image groups, so MME's question pairs stay whole).
"""
from __future__ import annotations

import base64
import io
import os
import random
from dataclasses import dataclass, field

from PIL import Image

KNOWN = {
    "OCRBench": "OCRBench.tsv",
    "MME": "MME.tsv",
    "TextVQA_VAL": "TextVQA_VAL.tsv",
    "DocVQA_VAL": "DocVQA_VAL.tsv",
}
REQUIRED_COLUMNS = ("index", "question", "answer")
REF_MAX_LEN = 64  # an `image` value this short is a reference to another row's index


class DatasetError(ValueError):
    pass


def tsv_path(data_root: str, name: str) -> str:
    if name.endswith(".tsv") and os.path.isfile(name):
        return name
    return os.path.join(data_root, KNOWN.get(name, f"{name}.tsv"))


def load_rows(data_root: str, name: str) -> list[dict]:
    """Rows of ``<data_root>/<name>.tsv`` as dicts (images still encoded; see :func:`image_of`)."""
    import pandas as pd

    path = tsv_path(data_root, name)
    if not os.path.isfile(path):
        raise DatasetError(
            f"dataset file {path} not found: put VLMEvalKit's {os.path.basename(path)} there (VLMEvalKit "
            f"downloads it to $LMUData, by default ~/LMUData, the first time it evaluates {name}), or pass "
            "--data_root with the folder that holds it"
        )
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if "image" not in df.columns and "image_path" not in df.columns:
        missing.append("image (or image_path)")
    if missing:
        raise DatasetError(f"{path} lacks column(s) {missing}; a VLMEvalKit TSV has index, image, question, "
                           "answer, category")
    rows = df.to_dict(orient="records")
    by_index = {str(r["index"]): r for r in rows}
    for r in rows:
        img = r.get("image", "")
        if img and len(img) <= REF_MAX_LEN:
            target = by_index.get(img)
            if target is None or len(target.get("image", "")) <= REF_MAX_LEN:
                raise DatasetError(f"{path}: row {r['index']} refers to image of row {img!r}, which has no image")
            r["image_ref"] = img
            r["image"] = target["image"]
        r["image_group"] = r.get("image_ref") or str(r["index"])
    return rows


def image_of(row: dict, data_root: str | None = None) -> Image.Image:
    """Decode a row's image (base64 ``image``, or a file named by ``image_path``)."""
    try:
        if row.get("image"):
            return Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
        path = row["image_path"]
        if data_root and not os.path.isabs(path):
            path = os.path.join(data_root, path)
        return Image.open(path).convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoding failure gets the same clear message
        raise DatasetError(f"row {row.get('index')}: the image does not decode ({type(e).__name__}: {e})") from e


def encode_image(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Split:
    calib: list[dict]
    eval: list[dict]
    source: str
    calib_indices: list[str] = field(default_factory=list)


def split_rows(rows: list[dict], n_calib: int, seed: int, calib_rows: list[dict] | None = None,
               calib_source: str = "heldout") -> Split:
    """Calibration rows and scored rows, disjoint.

    With ``calib_rows`` (another TSV) every row of ``rows`` is scored and calibration takes the first
    ``n_calib`` of a seeded shuffle of ``calib_rows``. Otherwise whole image groups of ``rows`` are
    drawn (seeded) until ``n_calib`` rows are held out; those rows are not scored."""
    rng = random.Random(seed)
    if calib_rows is not None:
        if n_calib > len(calib_rows):
            raise DatasetError(f"{n_calib} calibration rows requested but {calib_source} has {len(calib_rows)}")
        pool = list(calib_rows)
        rng.shuffle(pool)
        calib = pool[:n_calib]
        return Split(calib, list(rows), calib_source, [str(r["index"]) for r in calib])
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["image_group"], []).append(r)
    keys = list(groups)
    rng.shuffle(keys)
    calib, taken = [], set()
    for k in keys:
        if len(calib) >= n_calib:
            break
        calib += groups[k]
        taken.add(k)
    if n_calib and len(calib) >= len(rows):
        raise DatasetError(f"{n_calib} calibration rows would leave nothing to score in a dataset of {len(rows)} rows; "
                           "lower --nsamples/--calib_num or use --calib_source with another TSV")
    scored = [r for r in rows if r["image_group"] not in taken]
    # every held-out row is excluded from scoring, even the few beyond n_calib that complete an image group
    return Split(calib, scored, "heldout", [str(r["index"]) for r in calib])
