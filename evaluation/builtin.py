"""A small built-in set of generated images and prompts, for calibration when no dataset is given.

Images are drawn deterministically with PIL (coloured shapes on a plain background, some with a
large digit); each row has a question and its one-word answer. Row ``i`` is the same on every
machine, so results say exactly which rows calibrated.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "purple": (140, 60, 170), "orange": (240, 130, 30)}
SHAPES = ("square", "circle", "triangle")


def _draw(shape: str, color: tuple, size: int, rng: random.Random, digit: str | None) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    m = size // 6 + rng.randint(0, size // 10)
    box = [m, m, size - m, size - m]
    if shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "circle":
        d.ellipse(box, fill=color)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=color)
    if digit is not None:
        d.text((size // 2 - 3, size // 2 - 5), digit, fill=(0, 0, 0))
    return img


def builtin_rows(n: int, seed: int = 0, size: int = 112) -> list[dict]:
    """``n`` rows: {index, image, question, answer, category}."""
    rows = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        color = rng.choice(sorted(COLORS))
        shape = rng.choice(SHAPES)
        digit = str(rng.randint(0, 9)) if rng.random() < 0.5 else None
        kind = rng.choice(["color", "shape"] + (["digit"] if digit else []))
        question = {"color": "What color is the shape?", "shape": "What shape is shown?",
                    "digit": "Which digit is written on the shape?"}[kind]
        answer = {"color": color, "shape": shape, "digit": digit}[kind]
        rows.append({"index": i, "image": _draw(shape, COLORS[color], size, rng, digit),
                     "question": question + " Answer the question using a single word or phrase.",
                     "answer": answer, "category": kind})
    return rows
