"""MiniCPM-V 2.6's inputs: the original image slicing, the placeholder text, the chat template and the strips.

Slicing (``image_processing_minicpmv.py``): with S = ``scale_resolution`` (448) an image of w x h pixels is cut
into a grid of up to ``max_slice_nums`` (9) cells when w*h > S^2 -- the grid whose aspect ratio is closest to the
image's, among the factor pairs of (ceil(w*h / S^2) - 1, +0, +1) cells -- and comes with a "source" view resized
to about S^2 pixels at its aspect ratio; smaller images are one source view, upscaled to about S^2. Every side is
a multiple of 14 (``ensure_divide`` with Python's round-half-even), every resize is PIL bicubic, pixels are
normalized with mean = std = 0.5.

Placeholder text for image i: ``<image_id>i</image_id><image>`` + 64 ``<unk>`` + ``</image>``, then one line per
grid row of ``<slice>`` + 64 ``<unk>`` + ``</slice>`` per cell, rows joined by "\\n" (no "\\n" after ``</image>``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .config import MiniCPMVConfig

IMAGE_MARK = "(<image>./</image>)"  # what the chat template carries for each image before it is expanded


def ensure_divide(length: float, patch: int) -> int:
    return max(round(length / patch) * patch, patch)


def best_resize(w: int, h: int, scale: int, patch: int, upscale: bool = False) -> tuple[int, int]:
    if w * h > scale * scale or upscale:
        r = w / h
        h = int(scale / math.sqrt(r))
        w = int(h * r)
    return ensure_divide(w, patch), ensure_divide(h, patch)


def best_grid(w: int, h: int, scale: int, max_slices: int) -> tuple[int, int] | None:
    """(cols, rows) of the slicing grid, or None when the image is not sliced."""
    ratio = w * h / (scale * scale)
    m = min(math.ceil(ratio), max_slices)
    if m <= 1:
        return None
    counts = [n for n in (m - 1, m, m + 1) if 1 < n <= max_slices]
    target = math.log(w / h)
    best, best_err = None, float("inf")
    for n in counts:
        for cols in range(1, n + 1):
            if n % cols:
                continue
            err = abs(target - math.log(cols / (n // cols)))
            if err < best_err:  # strictly better: the first grid wins a tie
                best, best_err = (cols, n // cols), err
    return best


def slice_image(image: Image.Image, scale: int, patch: int, max_slices: int) -> tuple[Image.Image, list[list[Image.Image]]]:
    """The source view and the grid of cells (rows of images; empty when not sliced)."""
    image = image.convert("RGB")
    w, h = image.size
    grid = best_grid(w, h, scale, max_slices)
    if grid is None:
        return image.resize(best_resize(w, h, scale, patch, upscale=True), Image.BICUBIC), []
    source = image.resize(best_resize(w, h, scale, patch), Image.BICUBIC)
    cols, rows = grid
    cell_w, cell_h = best_resize(ensure_divide(w, cols) / cols, ensure_divide(h, rows) / rows, scale, patch,
                                 upscale=True)
    refined = image.resize((cell_w * cols, cell_h * rows), Image.BICUBIC)
    cells = [[refined.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)) for c in range(cols)]
             for r in range(rows)]
    return source, cells


def to_strip(image: Image.Image, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[3, patch, L * patch]``: the normalized image's patches, row-major, side by side; and (rows, cols)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - 0.5) / 0.5
    c, hh, ww = x.shape
    rows, cols = hh // patch, ww // patch
    x = x.reshape(c, rows, patch, cols, patch).permute(0, 2, 1, 3, 4).reshape(c, patch, rows * cols * patch)
    return x, (rows, cols)


class MiniCPMVProcessor:
    def __init__(self, tokenizer, cfg: MiniCPMVConfig, max_slice_nums: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.patch = cfg.patch_size
        self.max_slice_nums = max_slice_nums or cfg.max_slice_nums
        self.unk = tokenizer.unk_token or "<unk>"

    def placeholder(self, index: int, grid: tuple[int, int] | None) -> str:
        q = self.unk * self.cfg.query_num
        text = f"<image>{q}</image>"
        if self.cfg.use_image_id:
            text = f"<image_id>{index}</image_id>" + text
        if grid is not None:
            cols, rows = grid
            text += "\n".join(f"<slice>{q}</slice>" * cols for _ in range(rows))
        return text

    def prompt(self, question: str, n_images: int, system: str = "") -> str:
        """The chat template's text: the user turn is the images (one mark each) and the question joined by "\\n",
        as ``chat()`` builds it; a non-empty ``system`` goes first in the same turn, as VLMEvalKit passes it."""
        parts = ([system] if system else []) + [IMAGE_MARK] * n_images + [question]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": "\n".join(parts)}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, question: str, images: list, system: str = "", max_slice_nums: int | None = None) -> dict:
        max_slices = max_slice_nums or self.max_slice_nums
        text = self.prompt(question, len(images), system)
        strips, sizes = [], []
        for i, image in enumerate(images):
            source, cells = slice_image(image, self.cfg.scale_resolution, self.patch, max_slices)
            for view in [source, *(c for row in cells for c in row)]:
                strip, size = to_strip(view, self.patch)
                strips.append(strip)
                sizes.append(size)
            grid = (len(cells[0]), len(cells)) if cells else None
            if IMAGE_MARK not in text:
                raise ValueError("the chat template dropped an image mark")
            text = text.replace(IMAGE_MARK, self.placeholder(i, grid), 1)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        # the original hides every id-0 token ("!" in the Qwen2 vocabulary) from attention, as if it were its
        # left padding, and numbers positions over the rest
        out = {"input_ids": ids, "attention_mask": (ids != 0).long()}
        if strips:
            width = max(s.shape[-1] for s in strips)
            out["pixel_values"] = torch.stack([torch.nn.functional.pad(s, (0, width - s.shape[-1])) for s in strips])
            out["tgt_sizes"] = torch.tensor(sizes, dtype=torch.int32)
        return out

    def decode(self, token_ids) -> str:
        """The answer text as the original's ``_decode_text``: up to the first stop id, id-0 tokens dropped, special
        tokens kept (grounding answers carry ``<box>`` / ``<ref>``), stripped."""
        ids = [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
        stops = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode([t for t in ids[:cut] if t != 0], skip_special_tokens=False).strip()
