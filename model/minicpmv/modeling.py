"""MiniCPMV: SigLIP tower -> resampler (64 tokens per slice) -> Qwen2-7B, as in the released MiniCPM-V 2.6.

Each slice's 64 resampler outputs replace the 64 ``<unk>`` placeholders between an ``<image>`` / ``</image>``
or a ``<slice>`` / ``</slice>`` pair, in prompt order (an image's source view first, then its slices row by row);
every other token keeps its text embedding. The language model is transformers' own ``Qwen2ForCausalLM``
(keys ``llm.model.*``, ``llm.lm_head``), fed ``inputs_embeds``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..layers import beam_generate, cache_kwarg, greedy_generate
from .config import MiniCPMVConfig
from .vision import Resampler, SiglipVisionTower


def qwen2_language_model(cfg: MiniCPMVConfig) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qcfg = Qwen2Config(**cfg.llm)
    qcfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(qcfg)


def span_mask(input_ids: torch.Tensor, pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Bool ``[b, s]``: positions strictly inside any (open, close) token pair."""
    inside = torch.zeros_like(input_ids, dtype=torch.bool)
    for open_id, close_id in pairs:
        opened = (input_ids == open_id).long().cumsum(-1)
        closed = (input_ids == close_id).long().cumsum(-1)
        inside |= (opened > closed) & (input_ids != open_id)
    return inside


class MiniCPMV(nn.Module):
    def __init__(self, cfg: MiniCPMVConfig, llm: nn.Module | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.vpm = SiglipVisionTower(cfg.vision, cfg.vision_layers)
        self.resampler = Resampler(cfg)
        self.llm = llm if llm is not None else qwen2_language_model(cfg)
        self.span_pairs: tuple[tuple[int, int], ...] = ()  # (<image>, </image>), (<slice>, </slice>): from the tokenizer
        self.generation_eos: tuple[int, ...] = ()
        self.pad_token_id = 0
        self.num_beams, self.repetition_penalty = 1, 1.0  # VLMEvalKit's decoding is set by the adapter

    @property
    def decoder(self) -> nn.Module:
        return self.llm.model

    def image_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.span_pairs:
            raise RuntimeError("span_pairs is not set: load the model with its tokenizer")
        return span_mask(input_ids, self.span_pairs)

    def vision_features(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """``[slices, query_num, hidden]``; the tower runs ``vision_batch_size`` slices at a time, as the original."""
        n = self.config.vision_batch_size
        outs = [self.vpm(pixel_values[i:i + n], tgt_sizes[i:i + n]) for i in range(0, pixel_values.shape[0], n)]
        width = max(o.shape[1] for o in outs)
        feats = torch.cat([nn.functional.pad(o, (0, 0, 0, width - o.shape[1])) for o in outs])
        return self.resampler(feats, tgt_sizes)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, tgt_sizes=None,
                position_ids=None, past_key_values=None, use_cache: bool = False, **unused) -> CausalLMOutputWithPast:
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if tgt_sizes is None:
                raise ValueError("pixel_values need tgt_sizes (each slice's rows and columns of patches)")
            feats = self.vision_features(pixel_values, tgt_sizes)
            slots = self.image_slots(input_ids)
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(slots.sum())} image placeholders in the prompt for {feats.shape[0]} slices of "
                                 f"{feats.shape[1]} tokens: build inputs with the MiniCPM-V processor")
            embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 and past_key_values is None:
            # positions count only the attended tokens, as transformers' generate numbers them for the original
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = {cache_kwarg(type(self.decoder)): past_key_values} if past_key_values is not None else {}
        out = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache, **cache)
        return CausalLMOutputWithPast(logits=self.llm.get_output_embeddings()(out.last_hidden_state))

    def generate(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, tgt_sizes=None,
                 max_new_tokens: int = 32, do_sample: bool = False, eos_token_id=None, pad_token_id: int | None = None,
                 num_beams: int | None = None, repetition_penalty: float | None = None, **unused) -> torch.Tensor:
        """Beam search (``num_beams`` > 1, VLMEvalKit's 3 with repetition penalty 1.2 on the generated tokens) or
        greedy decoding, with a KV cache; returns the prompt followed by the answer."""
        if do_sample:
            raise ValueError("MiniCPMV.generate does not sample; use num_beams=1 for greedy decoding")
        eos = eos_token_id if eos_token_id is not None else self.generation_eos
        eos = (eos,) if isinstance(eos, int) else tuple(eos)
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        beams = self.num_beams if num_beams is None else num_beams
        penalty = self.repetition_penalty if repetition_penalty is None else repetition_penalty
        prefill = {"pixel_values": pixel_values, "tgt_sizes": tgt_sizes}
        if beams > 1:
            return beam_generate(self, input_ids, eos, beams, attention_mask, max_new_tokens, penalty, pad, **prefill)
        return greedy_generate(self, input_ids, eos, attention_mask, max_new_tokens, pad, **prefill)
