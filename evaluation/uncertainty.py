"""How much a benchmark score can be trusted: bootstrap intervals and agreement with a reference model.

A score on a few hundred rows moves by several points when a handful of answers flip, and float differences
between CPU kernels flip answers of a quantized model that is unsure of them. So every quantized setting is
reported with

* a 95% percentile-bootstrap interval of its score (rows drawn with replacement, the benchmark's own scorer
  applied to each draw);
* a 95% interval of its *paired* difference from the reference (the same draws for both models), which is what
  "not distinguishable from FP" must rest on: the difference interval contains 0;
* its agreement with the reference's answers: the fraction of rows where both give the same answer.

The resampling unit is what the scorer treats as one item: rows sharing an ``image_path`` (MME's question pairs,
scored with acc+) are drawn together; every other row is its own unit.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .scorers import score

Summary = Callable[[str, dict], float]


def overall(dataset_name: str, scores: dict) -> float:
    """The one number a table shows for a dataset, in percent (MME: acc + acc+ over categories, halved)."""
    if "Overall" in scores:
        return float(scores["Overall"])
    if "Final Score Norm" in scores:
        return float(scores["Final Score Norm"])
    cats = [k for k in scores if k not in ("perception", "reasoning")]
    if not cats:
        raise ValueError(f"{dataset_name}: no score to summarize in {sorted(scores)}")
    return sum(scores[c] for c in cats) / (2 * len(cats))


def units(rows: list[dict]) -> list[list[int]]:
    """Row positions grouped into resampling units (rows with one ``image_path`` form one unit)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        key = r.get("image_path") or r.get("image_group")
        groups.setdefault(f"img:{key}" if key else f"row:{i}", []).append(i)
    return list(groups.values())


def _draw(rows: list[dict], preds: list[str], picks: list[list[int]]) -> tuple[list[dict], list[str]]:
    """The rows of the drawn units; a unit drawn twice gets a fresh image key so its pairs stay pairs."""
    out_rows, out_preds = [], []
    for k, unit in enumerate(picks):
        for i in unit:
            r = rows[i]
            if r.get("image_path") or r.get("image_group"):
                r = {**r, "image_path": f"{r.get('image_path') or r.get('image_group')}#{k}"}
            out_rows.append(r)
            out_preds.append(preds[i])
    return out_rows, out_preds


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Uncertainty:
    score: float
    low: float                   # 95% bootstrap interval of the score
    high: float
    agreement: float | None      # percent of rows answered as the reference answers them
    diff: float | None           # score minus the reference's score
    diff_low: float | None       # 95% bootstrap interval of the paired difference
    diff_high: float | None

    def distinguishable(self) -> bool | None:
        """Whether the paired interval excludes 0 (None without a reference)."""
        if self.diff_low is None:
            return None
        return not (self.diff_low <= 0.0 <= self.diff_high)

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def same_answer(a: str, b: str) -> bool:
    return " ".join(str(a).lower().split()) == " ".join(str(b).lower().split())


def bootstrap(dataset_name: str, rows: list[dict], preds: list[str], ref_preds: list[str] | None = None,
              n_boot: int = 1000, seed: int = 0, summary: Summary = overall) -> Uncertainty:
    """Score ``preds`` on ``rows`` with a 95% interval, and (given ``ref_preds``) the paired difference from the
    reference and the agreement with it. Deterministic for a given ``seed``."""
    return bootstrap_table({dataset_name: (rows, preds, ref_preds)}, n_boot, seed, summary)[dataset_name]


def bootstrap_table(subsets: dict[str, tuple[list[dict], list[str], list[str] | None]], n_boot: int = 1000,
                    seed: int = 0, summary: Summary = overall) -> dict[str, Uncertainty]:
    """:func:`bootstrap` for several datasets at once, plus ``"mean"``: the mean of their scores, its interval and
    its paired difference from the reference's mean, each draw resampling every dataset."""
    if n_boot < 10:
        raise ValueError(f"n_boot must be at least 10, got {n_boot}")
    if not subsets:
        raise ValueError("nothing to score")
    paired = None
    for name, (rows, preds, ref) in subsets.items():
        if len(rows) != len(preds) or (ref is not None and len(ref) != len(rows)):
            raise ValueError(f"{name}: {len(rows)} rows, {len(preds)} predictions"
                             + ("" if ref is None else f", {len(ref)} reference predictions"))
        if paired is None:
            paired = ref is not None
        elif paired != (ref is not None):
            raise ValueError("give reference predictions for every dataset or for none")
    rng = random.Random(seed)
    groups = {name: units(rows) for name, (rows, _, _) in subsets.items()}
    vals = {name: [] for name in subsets}
    diffs = {name: [] for name in subsets}
    for _ in range(n_boot):
        for name, (rows, preds, ref) in subsets.items():
            us = groups[name]
            picks = [us[rng.randrange(len(us))] for _ in us]
            r, p = _draw(rows, preds, picks)
            v = summary(name, score(name, r, p))
            vals[name].append(v)
            if paired:
                _, q = _draw(rows, ref, picks)
                diffs[name].append(v - summary(name, score(name, r, q)))
    out, points, ref_points, agree = {}, [], [], []
    for name, (rows, preds, ref) in subsets.items():
        value = summary(name, score(name, rows, preds))
        ref_value = summary(name, score(name, rows, ref)) if paired else None
        agreement = 100.0 * sum(same_answer(a, b) for a, b in zip(preds, ref)) / len(rows) if paired else None
        out[name] = _result(value, vals[name], ref_value, diffs[name], agreement)
        points.append(value)
        ref_points.append(ref_value)
        agree.append((agreement, len(rows)))
    if len(subsets) > 1:
        k = len(subsets)
        mean_vals = [sum(v) / k for v in zip(*vals.values())]
        mean_diffs = [sum(d) / k for d in zip(*diffs.values())] if paired else []
        agreement = sum(a * n for a, n in agree) / sum(n for _, n in agree) if paired else None
        out["mean"] = _result(sum(points) / k, mean_vals, sum(ref_points) / k if paired else None, mean_diffs,
                              agreement)
    return out


def _result(value, vals, ref_value, diffs, agreement) -> Uncertainty:
    return Uncertainty(
        score=value, low=_percentile(vals, 0.025), high=_percentile(vals, 0.975), agreement=agreement,
        diff=None if ref_value is None else value - ref_value,
        diff_low=_percentile(diffs, 0.025) if diffs else None,
        diff_high=_percentile(diffs, 0.975) if diffs else None)
