"""SynthBench: a small built-in benchmark a CPU-sized MLLM can learn, in VLMEvalKit's TSV format.

Scenes of coloured shapes (colour, shape, count, left/right position) and large letters / digits, each question
with a one-word answer, in three subsets scored like the benchmarks they imitate:

* ``SynthBench_OCR`` -- reading (OCRBench-style: the reference text must appear in the answer), reported as
  ``{"Overall": percent}``;
* ``SynthBench_VQA`` -- colour / shape / count / position questions with 10 reference answers (TextVQA's VQA score);
* ``SynthBench_YN``  -- yes/no question pairs on one image (MME-style acc + acc+ per category; categories colour,
  count, position, existence).

Everything is a pure function of the seed. The evaluation split and the calibration split come from different
seeds; the files are written by

    python -m evaluation.synthbench [--out evaluation/synthbench_data]
"""
from __future__ import annotations

import argparse
import csv
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .datasets import encode_image

SIZE = 112
COLORS = {"red": (215, 38, 38), "green": (34, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20),
          "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
EVAL_SEED, CALIB_SEED = 1000, 2000  # training data for the projector uses yet other seeds
SUBSETS = ("SynthBench_OCR", "SynthBench_VQA", "SynthBench_YN")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthbench_data")  # the shipped files
YN_SUFFIX = " Please answer yes or no."


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[int, int, int, int]


def _background(rng: random.Random) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(225, 250) for _ in range(3)))


def _draw(img: Image.Image, o: Obj) -> None:
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = o.box
    fill = COLORS[o.color]
    if o.shape == "circle":
        d.ellipse(o.box, fill=fill)
    elif o.shape == "square":
        d.rectangle(o.box, fill=fill)
    else:
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _cell_box(rng: random.Random, cell: tuple[int, int], grid: int = 2) -> tuple[int, int, int, int]:
    """A square inside one cell of a grid x grid layout, with jitter."""
    cs = SIZE // grid
    side = rng.randint(cs * 5 // 10, cs * 8 // 10)
    x = cell[0] * cs + rng.randint(2, cs - side - 2)
    y = cell[1] * cs + rng.randint(2, cs - side - 2)
    return (x, y, x + side, y + side)


def _one_object(rng: random.Random) -> tuple[Image.Image, Obj]:
    img = _background(rng)
    side = rng.randint(48, 80)
    x, y = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
    o = Obj(rng.choice(SHAPES), rng.choice(sorted(COLORS)), (x, y, x + side, y + side))
    _draw(img, o)
    return img, o


def _count_scene(rng: random.Random, n: int) -> tuple[Image.Image, str, str]:
    img = _background(rng)
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    cells = rng.sample([(i, j) for i in range(2) for j in range(2)], n)
    for c in cells:
        _draw(img, Obj(shape, color, _cell_box(rng, c)))
    return img, shape, color


def _left_right_scene(rng: random.Random) -> tuple[Image.Image, Obj, Obj]:
    """Two different objects, one in the left half and one in the right half."""
    img = _background(rng)
    shapes = rng.sample(SHAPES, 2)
    colors = rng.sample(sorted(COLORS), 2)
    row = rng.randint(0, 1)
    left = Obj(shapes[0], colors[0], _cell_box(rng, (0, row)))
    right = Obj(shapes[1], colors[1], _cell_box(rng, (1, rng.randint(0, 1))))
    _draw(img, left)
    _draw(img, right)
    return img, left, right


def _text_scene(rng: random.Random) -> tuple[Image.Image, str]:
    img = _background(rng)
    text = "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 3)))
    font = ImageFont.load_default(size=rng.randint(34, 44))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
    x = rng.randint(2, max(2, SIZE - (x1 - x0) - 2)) - x0
    y = rng.randint(2, max(2, SIZE - (y1 - y0) - 2)) - y0
    d.text((x, y), text, fill=tuple(rng.randint(0, 90) for _ in range(3)), font=font)
    return img, text


def ocr_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for i in range(n):
        rng = random.Random(f"ocr-{seed}-{i}")
        img, text = _text_scene(rng)
        rows.append({"index": i, "image": img, "question": "What is written in the image?", "answer": [text],
                     "category": "reading"})
    return rows


def vqa_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for i in range(n):
        rng = random.Random(f"vqa-{seed}-{i}")
        kind = ("color", "shape", "count", "position")[i % 4]
        if kind in ("color", "shape"):
            img, o = _one_object(rng)
            q = f"What color is the {o.shape}?" if kind == "color" else "What shape is shown?"
            answers = [o.color if kind == "color" else o.shape] * 10
        elif kind == "count":
            k = rng.randint(1, 4)
            img, shape, _ = _count_scene(rng, k)
            q = f"How many {shape}s are there?"
            answers = [str(k)] * 5 + [NUMBER_WORDS[k]] * 5  # both normalize to the digit
        else:
            img, left, right = _left_right_scene(rng)
            target, side = (left, "left") if rng.random() < 0.5 else (right, "right")
            q = f"Is the {target.color} {target.shape} on the left or on the right?"
            answers = [side] * 10
        rows.append({"index": i, "image": img, "question": q, "answer": answers, "category": kind})
    return rows


def yn_rows(n_images: int, seed: int) -> list[dict]:
    rows = []
    for i in range(n_images):
        rng = random.Random(f"yn-{seed}-{i}")
        kind = ("color", "count", "position", "existence")[i % 4]
        if kind == "color":
            img, o = _one_object(rng)
            other = rng.choice([c for c in sorted(COLORS) if c != o.color])
            qa = [(f"Is the {o.shape} {o.color}?", "Yes"), (f"Is the {o.shape} {other}?", "No")]
        elif kind == "count":
            k = rng.randint(1, 4)
            img, shape, _ = _count_scene(rng, k)
            wrong = rng.choice([m for m in range(1, 5) if m != k])
            qa = [(f"Are there exactly {NUMBER_WORDS[k]} {shape}s in the image?", "Yes"),
                  (f"Are there exactly {NUMBER_WORDS[wrong]} {shape}s in the image?", "No")]
        elif kind == "position":
            img, left, right = _left_right_scene(rng)
            qa = [(f"Is the {left.color} {left.shape} on the left?", "Yes"),
                  (f"Is the {right.color} {right.shape} on the left?", "No")]
        else:
            img, o = _one_object(rng)
            absent = rng.choice([s for s in SHAPES if s != o.shape])
            qa = [(f"Is there a {o.shape} in the image?", "Yes"), (f"Is there a {absent} in the image?", "No")]
        if rng.random() < 0.5:
            qa.reverse()  # the yes question is not always first
        for j, (q, a) in enumerate(qa):
            rows.append({"index": 2 * i + j, "image": img, "image_path": f"synth/{kind}/{i}.png",
                         "question": q + YN_SUFFIX, "answer": a, "category": kind})
    return rows


def subset_rows(name: str, n: int, seed: int) -> list[dict]:
    if name == "SynthBench_OCR":
        return ocr_rows(n, seed)
    if name == "SynthBench_VQA":
        return vqa_rows(n, seed)
    if name == "SynthBench_YN":
        return yn_rows(n // 2, seed)
    raise ValueError(f"unknown SynthBench subset {name!r}; use one of {SUBSETS}")


def write_tsv(path: str, rows: list[dict]) -> None:
    cols = ["index", "image", "question", "answer", "category"] + (["image_path"] if "image_path" in rows[0] else [])
    seen: dict[str, int] = {}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
        w.writeheader()
        for r in rows:
            out = {k: r[k] for k in cols if k != "image"}
            key = r.get("image_path")
            if key is not None and key in seen:
                out["image"] = str(seen[key])  # the pair's second question refers to the first one's image
            else:
                out["image"] = encode_image(r["image"])
                if key is not None:
                    seen[key] = r["index"]
            if isinstance(out["answer"], list):
                out["answer"] = repr(out["answer"])
            w.writerow(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DATA_DIR)
    ap.add_argument("--n_eval", type=int, default=120)
    ap.add_argument("--n_calib", type=int, default=64)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in SUBSETS:
        write_tsv(os.path.join(args.out, f"{name}.tsv"), subset_rows(name, args.n_eval, EVAL_SEED))
        write_tsv(os.path.join(args.out, f"{name}_calib.tsv"), subset_rows(name, args.n_calib, CALIB_SEED))
    print(f"wrote {len(SUBSETS) * 2} TSVs to {args.out}")


if __name__ == "__main__":
    main()
