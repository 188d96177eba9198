"""Images and prompts the way InternVL2 was trained on them.

Images: the image is resized to the grid of 448-px tiles (``cols x rows``, ``min_num <= cols*rows <=
max_num``) whose aspect ratio is closest to its own -- on a tie the larger grid wins when the image has
more than half the pixels of that grid -- cut into tiles row by row, and followed by a 448-px thumbnail
of the whole image when there is more than one tile; bicubic resizing, ImageNet mean / std.

Prompts: each image becomes ``<img>`` + ``<IMG_CONTEXT>`` x (256 x tiles) + ``</img>`` where the question
says ``<image>`` (prepended as ``<image>\\n`` when absent; ``Image-1: <image>\\n`` ... for several images),
inside the checkpoint's chat template.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# the default system message of InternVL2's chat templates
SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class Template:
    system: str                # "{system}" is replaced by the system message
    user: str                  # "{query}"
    assistant: str             # the generation prompt
    stop: tuple[str, ...]      # tokens that end the answer


CHATML = Template(system="<|im_start|>system\n{system}<|im_end|>", user="<|im_start|>user\n{query}<|im_end|>",
                  assistant="<|im_start|>assistant\n", stop=("<|im_end|>",))
TEMPLATES = {"internlm2-chat": CHATML, "Hermes-2": CHATML}


def template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"chat template {name!r} (config.json 'template') is not supported; known: "
                         f"{sorted(TEMPLATES)}") from None


def grid_candidates(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(cols, rows) with ``min_num <= cols*rows <= max_num``, by tile count, then as generated."""
    seen = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
            if min_num <= i * j <= max_num}
    return sorted(seen, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, size: int, min_num: int, max_num: int) -> tuple[int, int]:
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grid_candidates(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def tiles(image: Image.Image, size: int = 448, min_num: int = 1, max_num: int = 12,
          use_thumbnail: bool = True) -> list[Image.Image]:
    image = image.convert("RGB")
    cols, rows = choose_grid(image.width, image.height, size, min_num, max_num)
    resized = image.resize((cols * size, rows * size), Image.BICUBIC)
    out = [resized.crop(((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size))
           for k in range(cols * rows)]
    if use_thumbnail and len(out) > 1:
        out.append(image.resize((size, size), Image.BICUBIC))
    return out


def to_tensor(tile: Image.Image, size: int) -> torch.Tensor:
    if tile.size != (size, size):
        tile = tile.resize((size, size), Image.BICUBIC)
    a = np.asarray(tile, dtype=np.float32) / 255.0
    a = (a - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


class InternVLProcessor:
    """Builds ``input_ids`` / ``attention_mask`` / ``pixel_values`` for one conversation turn."""

    def __init__(self, tokenizer, cfg, max_num: int | None = None, system: str = SYSTEM_MESSAGE) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.template = template(cfg.template)
        self.max_num = cfg.max_dynamic_patch if max_num is None else max_num
        self.system = system
        self.context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.stop_ids = tuple(tokenizer.convert_tokens_to_ids(s) for s in self.template.stop)

    def image_tiles(self, image: Image.Image, max_num: int | None = None) -> torch.Tensor:
        c = self.cfg
        if c.dynamic_image_size:
            ts = tiles(image, c.image_size, c.min_dynamic_patch, self.max_num if max_num is None else max_num,
                       c.use_thumbnail)
        else:
            ts = [image.convert("RGB")]
        return torch.stack([to_tensor(t, c.image_size) for t in ts])

    def prompt(self, question: str, tile_counts: list[int]) -> str:
        if tile_counts and "<image>" not in question:
            if len(tile_counts) == 1:
                question = "<image>\n" + question
            else:
                question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(tile_counts))) + question
        if question.count("<image>") != len(tile_counts):
            raise ValueError(f"the question has {question.count('<image>')} <image> placeholders for "
                             f"{len(tile_counts)} images")
        t = self.template
        text = (t.system.format(system=self.system) if self.system else "") + t.user.format(query=question) + t.assistant
        for n in tile_counts:
            text = text.replace("<image>", IMG_START + IMG_CONTEXT * (self.cfg.num_image_token * n) + IMG_END, 1)
        return text

    def __call__(self, question: str, images: list | None = None, max_num: int | None = None) -> dict:
        images = list(images or [])
        per_image = [self.image_tiles(im, max_num) for im in images]
        ids = self.tokenizer.encode(self.prompt(question, [p.shape[0] for p in per_image]))
        input_ids = torch.tensor([ids])
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if per_image:
            out["pixel_values"] = torch.cat(per_image)
        return out

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
