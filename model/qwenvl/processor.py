"""Qwen-VL-Chat's inputs: the chat prompt with its image spans, and the pixels.

Images are squashed to ``image_size`` x ``image_size`` (448; aspect ratio not kept) with PIL's bicubic
resampling -- what the original's torchvision ``Resize`` does on a PIL image -- scaled to [0, 1] and
normalized with the CLIP mean / std. The prompt is the original chat format: ``Picture n: <img>path</img>\\n``
per image, then the question, inside the chatml template with the default system message.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import QWenConfig
from .tokenizer import QWenTokenizer

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM = "You are a helpful assistant."


class QWenVLProcessor:
    def __init__(self, tokenizer: QWenTokenizer, cfg: QWenConfig, system: str = SYSTEM) -> None:
        self.tokenizer = tokenizer
        self.image_size = cfg.visual.image_size
        self.system = system

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """``[3, S, S]`` float32."""
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]

    def query(self, question: str, n_images: int, image_paths: list[str] | None = None) -> str:
        """The user turn: one ``Picture n: <img>...</img>`` line per image, then the question. The span holds
        the image's path in the original (the model opened the file named there); the pixels come separately
        here, so without paths the span is all ``<imgpad>`` -- the slots' embeddings are replaced either way."""
        paths = image_paths if image_paths is not None else [""] * n_images
        if len(paths) != n_images:
            raise ValueError(f"{len(paths)} image paths for {n_images} images")
        return self.tokenizer.from_list_format([*({"image": p} for p in paths), {"text": question}])

    def __call__(self, question: str, images: list, image_paths: list[str] | None = None) -> dict:
        _, ids = self.tokenizer.make_context(self.query(question, len(images), image_paths), system=self.system)
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if images:
            out["pixel_values"] = torch.stack([self.pixels(im) for im in images])
        return out

    def decode(self, token_ids) -> str:
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        return self.tokenizer.decode_response(ids)
