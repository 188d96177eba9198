"""Tiny random-weight configurations for tests and smoke runs (built offline in a second).

Widths have non-power-of-two Hadamard factors (96 = 12 * 8, 80 = 20 * 4, head dims 48 = 12 * 4 and
40 = 20 * 2) so every code path that handles K != 1 is exercised.
"""
from __future__ import annotations

import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 290, 291, 292, 293


def qwen2vl_config(**overrides):
    from transformers import Qwen2VLConfig

    text = dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=300, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [4, 8, 8]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=2, embed_dim=96, hidden_size=80, num_heads=2, mlp_ratio=4, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    return Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                         vision_end_token_id=VISION_END, **overrides)


def qwen25vl_config(**overrides):
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=300, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [4, 8, 8]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=2, hidden_size=96, out_hidden_size=80, intermediate_size=192, num_heads=2,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[1])
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                            video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                            vision_end_token_id=VISION_END, **overrides)


def qwen25vl_model(seed: int = 0, perturb: bool = True, **overrides):
    """A tiny Qwen2.5-VL (RMSNorm ViT with a gated MLP and window attention), float32, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(**overrides)).float().eval()
    if perturb:
        randomize_norms_and_biases(model, seed)
    return model


def qwen2vl_model(seed: int = 0, perturb: bool = True, **overrides):
    """A tiny Qwen2-VL in float32 and eval mode. ``perturb`` randomizes every norm scale/bias and
    linear bias (fresh models have gamma = 1, beta = 0, which would hide fusion mistakes)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(qwen2vl_config(**overrides)).float().eval()
    if perturb:
        randomize_norms_and_biases(model, seed)
    return model


@torch.no_grad()
def randomize_norms_and_biases(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
        is_norm = any(k in owner for k in ("norm", "ln_", "layernorm")) or owner.startswith("ln")
        if is_norm and leaf == "weight":
            p.copy_(1.0 + 0.3 * scale * torch.randn(p.shape, generator=g))
        elif leaf == "bias" or (is_norm and leaf == "bias"):
            p.copy_(0.1 * scale * torch.randn(p.shape, generator=g))
        elif "lambda" in leaf or leaf in ("ls1", "ls2"):
            p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))


def qwen2vl_inputs(grid_hw: tuple[int, int] = (4, 6), text_before=(5, 6), text_after=(7, 8, 9), seed: int = 0):
    """Input ids with one image, pixel patches and the grid, as the processor would return them."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid_hw
    n_patches = h * w
    n_tokens = n_patches // 4
    ids = torch.tensor([[*text_before, VISION_START] + [IMAGE_TOKEN] * n_tokens + [VISION_END, *text_after]])
    pixel_values = torch.randn(n_patches, 3 * 2 * 14 * 14, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, h, w]]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
    }


class TinyQwenProcessor:
    """Stands in for a Qwen2-VL processor on the tiny models: a real Qwen2-VL image processor
    (small pixel budget) and a character-level tokenizer whose ids stay below the special tokens."""

    PAD = "<|image_pad|>"

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> None:
        from transformers import Qwen2VLImageProcessor

        self.image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        self.merge = 4

    @staticmethod
    def encode(text: str) -> list[int]:
        return [10 + (ord(c) % 270) for c in text]

    @staticmethod
    def decode_ids(ids) -> str:
        return "".join(chr(i - 10) for i in ids if 10 <= i < 280)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode_ids([int(t) for t in row]) for row in ids]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False) -> str:
        parts = []
        for m in messages:
            for c in m["content"]:
                parts.append(self.PAD if c["type"] == "image" else c["text"])
        return "".join(parts) + ("\n" if add_generation_prompt else "")

    def __call__(self, text, images=None, return_tensors: str = "pt") -> dict:
        prompt = text[0]
        out: dict = {}
        grids = []
        if images:
            pix = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = pix["pixel_values"]
            out["image_grid_thw"] = pix["image_grid_thw"]
            grids = [int(g.prod()) // self.merge for g in pix["image_grid_thw"]]
        pieces = prompt.split(self.PAD)
        if len(pieces) - 1 != len(grids):
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(grids)} images")
        ids = [1]
        for i, piece in enumerate(pieces):
            ids += self.encode(piece)
            if i < len(grids):
                ids += [VISION_START] + [IMAGE_TOKEN] * grids[i] + [VISION_END]
        input_ids = torch.tensor([ids])
        out["input_ids"] = input_ids
        out["attention_mask"] = torch.ones_like(input_ids)
        out["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
        return out
