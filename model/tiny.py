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


class TinyProcessor:
    """Stands in for a processor on the tiny models: a character-level tokenizer whose ids stay
    below the special tokens, a minimal chat template, and image placeholders expanded per image."""

    PAD = "<|image_pad|>"

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

    def images(self, images) -> tuple[dict, list[int]]:
        """Image tensors and the number of placeholder tokens of each image."""
        raise NotImplementedError

    def image_ids(self, n: int) -> list[int]:
        return [IMAGE_TOKEN] * n

    def __call__(self, text, images=None, return_tensors: str = "pt", **unused) -> dict:
        out, counts = self.images(images) if images else ({}, [])
        pieces = text[0].split(self.PAD)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"{len(pieces) - 1} image placeholders for {len(counts)} images")
        ids = [1]
        for i, piece in enumerate(pieces):
            ids += self.encode(piece)
            if i < len(counts):
                ids += self.image_ids(counts[i])
        input_ids = torch.tensor([ids])
        return {**out, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class TinyQwenProcessor(TinyProcessor):
    """A real Qwen2-VL image processor with a small pixel budget."""

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> None:
        from transformers import Qwen2VLImageProcessor

        self.image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
        self.merge = 4

    def images(self, images) -> tuple[dict, list[int]]:
        pix = self.image_processor(images=images, return_tensors="pt")
        counts = [int(g.prod()) // self.merge for g in pix["image_grid_thw"]]
        return {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}, counts

    def image_ids(self, n: int) -> list[int]:
        return [VISION_START] + [IMAGE_TOKEN] * n + [VISION_END]


class TinyLlavaProcessor(TinyProcessor):
    """Resize to a square, ImageNet normalization, one placeholder per patch (CLS dropped)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, size: int = 56, patch: int = 14) -> None:
        self.size, self.patch = size, patch

    def images(self, images) -> tuple[dict, list[int]]:
        import numpy as np

        arrays = []
        for img in images:
            a = np.asarray(img.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 255.0
            arrays.append((a - np.array(self.MEAN, dtype=np.float32)) / np.array(self.STD, dtype=np.float32))
        pixel_values = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return {"pixel_values": pixel_values}, [(self.size // self.patch) ** 2] * len(images)


def llava_config(**overrides):
    """Tiny LLaVA: a DINOv2 tower with LayerScale (96 = 12 * 8 wide) and a Llama LM with tied embeddings."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig

    vision = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=384, image_size=56,
                  patch_size=14, layerscale_value=0.5)
    text = dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=300, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, max_position_embeddings=1024)
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    overrides.setdefault("vision_feature_layer", -1)
    return LlavaConfig(vision_config=Dinov2Config(**vision), text_config=LlamaConfig(**text), image_token_id=IMAGE_TOKEN,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu", **overrides)


def llava_model(seed: int = 0, perturb: bool = True, **overrides):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(**overrides)).float().eval()
    if perturb:
        randomize_norms_and_biases(model, seed)
        with torch.no_grad():
            model.model.vision_tower.embeddings.cls_token.normal_()
            model.model.vision_tower.embeddings.position_embeddings.normal_(std=0.5)
    return model
