"""InternVLChatModel: InternViT -> pixel shuffle -> ``mlp1`` -> language model, as in the released
InternVL2 checkpoints (module names ``vision_model``, ``mlp1``, ``language_model``).

Each 448-px tile gives 1024 ViT patch tokens (class token dropped); the pixel shuffle concatenates each
2x2 neighbourhood into one 4096-wide vector (256 per tile), and ``mlp1`` (LayerNorm over all 4096,
Linear, GELU, Linear) maps it into the LLM's embedding space, where it replaces the ``<IMG_CONTEXT>``
placeholders of the prompt.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..layers import cache_kwarg, greedy_generate
from .config import InternVLConfig
from .internlm2 import InternLM2ForCausalLM
from .vision import InternVisionModel


def pixel_shuffle(x: torch.Tensor, ratio: float, version: str = "v2") -> torch.Tensor:
    """``[n, h, w, c]`` -> ``[n, h*r, w*r, c/r^2]`` (r = ``ratio``, 0.5 in InternVL2): with r = 0.5 output
    token (i, j) is the concatenation of input tokens (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
    ``v1`` (the first InternVL release) leaves the two spatial axes transposed."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * ratio), int(c / ratio))         # neighbouring columns side by side
    x = x.transpose(1, 2)
    x = x.reshape(n, int(w * ratio), int(h * ratio), int(c / (ratio * ratio)))  # then neighbouring rows
    return x.transpose(1, 2) if version == "v2" else x


def connector(in_width: int, out_width: int) -> nn.Sequential:
    """``mlp1``: LayerNorm(in) -> Linear(in, out) -> GELU -> Linear(out, out)."""
    return nn.Sequential(nn.LayerNorm(in_width), nn.Linear(in_width, out_width), nn.GELU(),
                         nn.Linear(out_width, out_width))


def vision_layers_used(cfg: InternVLConfig) -> int:
    """How many ViT layers ``select_layer`` reads (-1: all of them)."""
    n, sel = cfg.vision.num_hidden_layers, cfg.select_layer
    used = n + 1 + sel if sel < 0 else sel
    if not 1 <= used <= n:
        raise ValueError(f"select_layer {sel} is outside the {n} vision layers")
    return used


def qwen2_language_model(cfg: InternVLConfig) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm = {k: v for k, v in cfg.llm.items() if k not in ("architectures", "attn_implementation", "_attn_implementation",
                                                         "torch_dtype", "dtype", "auto_map", "_name_or_path")}
    qcfg = Qwen2Config(**llm)
    qcfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(qcfg)


class InternVLChatModel(nn.Module):
    def __init__(self, cfg: InternVLConfig, language_model: nn.Module | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.vision_model = InternVisionModel(cfg.vision, vision_layers_used(cfg))
        self.mlp1 = connector(cfg.vision.hidden_size * cfg.shuffle_factor, cfg.llm_hidden_size)
        if language_model is None:
            if cfg.llm_kind != "internlm2":
                raise ValueError(f"build the {cfg.llm_kind} language model first and pass it in")
            language_model = InternLM2ForCausalLM(cfg.internlm2())
        self.language_model = language_model
        self.img_context_token_id: int | None = None  # set from the tokenizer when loading
        self.generation_eos: tuple[int, ...] = ()      # the chat template's stop tokens, set when loading

    # -- paths the adapter describes ------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.language_model.model

    # -- forward --------------------------------------------------------------------------------
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, 3, S, S]`` -> ``[tiles, num_image_token, llm hidden]``."""
        feats = self.vision_model(pixel_values)[:, 1:]
        n, t, c = feats.shape
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(f"the vision tower returned {t} patch tokens, not a square grid")
        feats = pixel_shuffle(feats.reshape(n, side, side, c), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(feats.reshape(n, -1, feats.shape[-1]))

    def forward(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, position_ids=None,
                past_key_values=None, use_cache: bool = False, **unused) -> CausalLMOutputWithPast:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if self.img_context_token_id is None:
                raise RuntimeError("img_context_token_id is not set: load the model with its tokenizer")
            vit = self.extract_feature(pixel_values)
            slots = input_ids == self.img_context_token_id
            if int(slots.sum()) != vit.shape[0] * vit.shape[1]:
                raise ValueError(f"{int(slots.sum())} <IMG_CONTEXT> tokens in the prompt for {vit.shape[0]} tiles of "
                                 f"{vit.shape[1]} tokens: build inputs with the InternVL processor")
            embeds = embeds.masked_scatter(slots[..., None], vit.to(embeds.dtype))
        cache = {cache_kwarg(type(self.decoder)): past_key_values} if past_key_values is not None else {}
        out = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache, **cache)
        head = self.language_model.get_output_embeddings()
        return CausalLMOutputWithPast(logits=head(out.last_hidden_state))

    def generate(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                 do_sample: bool = False, eos_token_id=None, pad_token_id: int | None = None, **unused) -> torch.Tensor:
        """Greedy decoding with a KV cache (:func:`model.layers.greedy_generate`)."""
        if do_sample:
            raise ValueError("InternVLChatModel.generate decodes greedily; do_sample=True is not supported")
        eos = eos_token_id if eos_token_id is not None else self.generation_eos
        return greedy_generate(self, input_ids, (eos,) if isinstance(eos, int) else tuple(eos), attention_mask,
                               max_new_tokens, pad_token_id, pixel_values=pixel_values)
