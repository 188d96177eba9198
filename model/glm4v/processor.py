"""GLM-4V's inputs: one user turn with its image, and the pixels.

The original does this in its tokenizer (``apply_chat_template`` with an ``image``): torchvision ``Resize`` to
``image_size`` x ``image_size`` (1120; aspect ratio not kept) with bicubic interpolation on the PIL image -- PIL's
own bicubic resize -- then ``ToTensor`` and the OpenAI CLIP mean / std. One image per conversation.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..qwenvl.processor import MEAN, STD
from .config import ChatGLMConfig
from .tokenizer import GLM4Tokenizer


class GLM4VProcessor:
    def __init__(self, tokenizer: GLM4Tokenizer, cfg: ChatGLMConfig) -> None:
        self.tokenizer = tokenizer
        self.image_size = cfg.vision.image_size

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """``[3, S, S]`` float32."""
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]

    def __call__(self, question: str, images: list) -> dict:
        if len(images) > 1:
            raise ValueError(f"{len(images)} images in one question: GLM-4V takes one image per conversation "
                             "(the original asserts it)")
        ids = self.tokenizer.chat_ids(question, image=bool(images))
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if images:
            out["pixel_values"] = self.pixels(images[0])[None]
        return out

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode_response(token_ids)
