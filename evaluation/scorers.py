"""The benchmark metrics, computed exactly as VLMEvalKit reports them (same keys, same scales).

    score(dataset_name, rows, predictions) -> dict

``rows`` are TSV rows as dicts (``answer`` as the TSV stores it -- a Python list literal for
OCRBench / TextVQA / DocVQA --, ``category``, ``image_path`` ...), ``predictions`` the model's raw
output strings in the same order.

* OCRBench: a row scores 1 when any reference answer is a substring of the prediction (both
  lower-cased and stripped, newlines as spaces; for handwritten mathematical expressions case is
  kept and all spaces are removed). Keys: 'Text Recognition' (six recognition categories
  together), 'Scene Text-centric VQA', 'Doc-oriented VQA', 'Key Information Extraction',
  'Handwritten Mathematical Expression Recognition', 'Final Score' (a count, 1000 rows max) and
  'Final Score Norm' (Final Score / 10).
* TextVQA: the VQA accuracy -- answers and prediction normalized (punctuation, periods, number
  words, articles, contractions), then for each of the reference answers min(1, #other references
  equal to the prediction / 3), averaged. 'Overall' in 0-100, plus one key per split (if the TSV has
  a split column) or per category.
* DocVQA: ANLS -- 1 - normalized Levenshtein distance to the closest answer, 0 below 0.5. Same keys.
* MME: 'Yes'/'No' extracted from the output as whole words (neither or both: 'Unknown', which is
  wrong -- VLMEvalKit would ask an LLM judge about those; this is its exact-matching mode). Per
  category acc + acc+ (both questions of an image right), in 0-200; 'perception' and 'reasoning'
  sum their categories that are present.
"""
from __future__ import annotations

import ast
import functools
import re

import numpy as np

# -- VQA answer normalization ------------------------------------------------------------------
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")
# VLMEvalKit passes re.UNICODE (= 32) where sub() takes `count`: at most 32 periods are removed.
PERIOD_COUNT = int(re.UNICODE)
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}

# Contracted forms; each is reached from every spelling that lacks exactly one of its apostrophes
# (dont -> don't; hadnt've and hadn'tve -> hadn't've). Upper-case keys can never match (text is
# lower-cased first) but are kept so the table is the reference's.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've
you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in _CONTRACTED:
        for i, ch in enumerate(form):
            if ch == "'":
                table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"  # the reference table maps this one backwards
    return table


CONTRACTIONS = _contraction_table()


def process_punctuation(text: str) -> str:
    out = text
    strip_all = COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCT:
        if strip_all or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_NOT_IN_NUMBER.sub("", out, count=PERIOD_COUNT)


@functools.lru_cache(maxsize=1 << 16)  # pure; bootstrap intervals rescore the same strings many times
def normalize_vqa_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = process_punctuation(text)
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def parse_answers(answer) -> list[str]:
    """The reference answers of a row: a list literal as stored in the TSV, or a single string."""
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    return list(_parse_answer_text(str(answer)))


@functools.lru_cache(maxsize=1 << 16)
def _parse_answer_text(s: str) -> tuple[str, ...]:
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return (s,)
    return tuple(str(a) for a in value) if isinstance(value, list) else (s,)


def vqa_accuracy(answers: list[str], prediction: str) -> float:
    gts = [normalize_vqa_answer(a) for a in answers]
    pred = normalize_vqa_answer(str(prediction))
    per_gt = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        per_gt.append(min(1.0, matches / 3))
    return float(np.mean(per_gt))


# -- ANLS --------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b):
        cur = [j + 1]
        for i, ca in enumerate(a):
            cur.append(prev[i] if ca == cb else 1 + min(prev[i], prev[i + 1], cur[-1]))
        prev = cur
    return prev[-1]


def anls(answers: list[str], prediction: str, threshold: float = 0.5) -> float:
    pred = str(prediction)
    best = 1.0
    for gt in answers:
        g = " ".join(gt.strip().lower().split())
        p = " ".join(pred.strip().lower().split())
        length = max(len(gt.upper()), len(pred.upper()))  # raw strings, upper-cased ("ß" -> "SS"), as VLMEvalKit
        best = min(best, 0.0 if length == 0 else levenshtein(g, p) / length)
    s = 1.0 - best
    return 0.0 if s < threshold else s


# -- OCRBench ----------------------------------------------------------------------------------
OCR_RECOGNITION = ["Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                   "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"]
OCR_OTHERS = ["Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
              "Handwritten Mathematical Expression Recognition"]
HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(category: str, answers: list[str], prediction: str) -> int:
    pred = str(prediction)
    for ans in answers:
        if category == HME:
            a = ans.strip().replace("\n", " ").replace(" ", "")
            p = pred.strip().replace("\n", " ").replace(" ", "")
        else:
            a = ans.lower().strip().replace("\n", " ")
            p = pred.lower().strip().replace("\n", " ")
        if a in p:
            return 1
    return 0


def score_ocrbench(rows: list[dict], predictions: list[str]) -> dict:
    counts = {c: 0 for c in OCR_RECOGNITION + OCR_OTHERS}
    for row, pred in zip(rows, predictions):
        cat = row["category"]
        if cat not in counts:
            raise ValueError(f"OCRBench row {row.get('index')}: unknown category {cat!r}")
        counts[cat] += ocrbench_hit(cat, parse_answers(row["answer"]), pred)
    out = {"Text Recognition": sum(counts[c] for c in OCR_RECOGNITION)}
    out.update({c: counts[c] for c in OCR_OTHERS})
    out["Final Score"] = sum(out.values())
    out["Final Score Norm"] = float(out["Final Score"]) / 10
    return out


def _split_or_category_means(rows: list[dict], per_row: list[float]) -> dict:
    out = {}
    if any("split" in r for r in rows):
        for sp in sorted({r.get("split") for r in rows}, key=str):
            out[sp] = float(np.mean([s for r, s in zip(rows, per_row) if r.get("split") == sp])) * 100
        out["Overall"] = float(np.mean(per_row)) * 100
        return out
    out["Overall"] = float(np.mean(per_row)) * 100
    if any("category" in r for r in rows):
        for c in sorted({r.get("category") for r in rows}, key=str):
            out[c] = float(np.mean([s for r, s in zip(rows, per_row) if r.get("category") == c])) * 100
    return out


def score_textvqa(rows: list[dict], predictions: list[str]) -> dict:
    return _split_or_category_means(rows, [vqa_accuracy(parse_answers(r["answer"]), p) for r, p in zip(rows, predictions)])


def score_docvqa(rows: list[dict], predictions: list[str]) -> dict:
    return _split_or_category_means(rows, [anls(parse_answers(r["answer"]), p) for r, p in zip(rows, predictions)])


# -- MME -----------------------------------------------------------------------------------------
MME_PERCEPTION = ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters", "scene"]
MME_REASONING = ["code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]


def yes_no(output: str) -> str:
    words = process_punctuation(str(output).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def score_mme(rows: list[dict], predictions: list[str]) -> dict:
    stats: dict[str, dict[str, list[float]]] = {}
    for row, pred in zip(rows, predictions):
        image = row.get("image_path") or row.get("image_group") or str(row.get("index"))
        hit = 1.0 if yes_no(pred) == str(row["answer"]) else 0.0
        stats.setdefault(row["category"], {}).setdefault(image, []).append(hit)
    scores = {}
    for cat, images in stats.items():
        acc = np.mean([v for vals in images.values() for v in vals]) * 100
        acc_plus = np.mean([vals[0] * vals[1] if len(vals) > 1 else vals[0] for vals in images.values()]) * 100
        scores[cat] = float(acc + acc_plus)
    out = {"perception": sum(scores[c] for c in MME_PERCEPTION if c in scores),
           "reasoning": sum(scores[c] for c in MME_REASONING if c in scores)}
    out.update(scores)
    return out


def score_reading(rows: list[dict], predictions: list[str]) -> dict:
    """OCRBench's containment rule as a percentage (SynthBench's reading subset)."""
    hits = [ocrbench_hit("reading", parse_answers(r["answer"]), p) for r, p in zip(rows, predictions)]
    return {"Overall": 100.0 * sum(hits) / len(hits)}


# the built-in SynthBench subsets come first: their names contain no benchmark name, but be explicit
SCORERS = {"SynthBench_OCR": score_reading, "SynthBench_VQA": score_textvqa, "SynthBench_YN": score_mme,
           "OCRBench": score_ocrbench, "TextVQA": score_textvqa, "DocVQA": score_docvqa, "MME": score_mme}


def scorer_for(dataset_name: str):
    for key, fn in SCORERS.items():
        if key.lower() in dataset_name.lower():
            return fn
    raise ValueError(f"no scorer for dataset {dataset_name!r}; known: {sorted(SCORERS)}")


def score(dataset_name: str, rows: list[dict], predictions: list[str]) -> dict:
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    if not rows:
        raise ValueError("nothing to score")
    return scorer_for(dataset_name)(rows, [str(p) for p in predictions])
