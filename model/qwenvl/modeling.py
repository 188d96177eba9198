"""QWenLMHeadModel: the ViT + resampler features spliced into the QWen decoder's input, as Qwen-VL-Chat does.

Each image of the prompt is a span ``<img>`` + 256 slots + ``</img>`` (the tokenizer fills the slots with the
image path's bytes and ``<imgpad>``); the original opens the file named there, this model takes the pixels
as ``pixel_values`` instead. At prefill the embeddings of all 256 slots of image i are overwritten by the
tower's 256 output vectors for image i; ``<img>`` / ``</img>`` keep their own embeddings. Decoding steps
never look at images.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..layers import greedy_generate
from .config import QWenConfig
from .qwen import QWenModel


def image_slot_mask(input_ids: torch.Tensor, image_start_id: int) -> torch.Tensor:
    """Bool ``[b, s]``: the positions strictly between each ``<img>`` (``image_start_id``) and the ``</img>``
    after it (``image_start_id + 1``)."""
    start = (input_ids == image_start_id).long().cumsum(-1)
    end = (input_ids == image_start_id + 1).long().cumsum(-1)
    return (start > end) & (input_ids != image_start_id)


class QWenLMHeadModel(nn.Module):
    def __init__(self, cfg: QWenConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = QWenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.generation_eos: tuple[int, ...] = ()  # set from the tokenizer when loading
        self.pad_token_id: int | None = None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def image_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        return image_slot_mask(input_ids, self.config.visual.image_start_id)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, position_ids=None,
                past_key_values=None, use_cache: bool = False, **unused) -> CausalLMOutputWithPast:
        embeds = self.transformer.wte(input_ids)
        if pixel_values is not None:
            feats = self.transformer.visual(pixel_values)
            slots = self.image_slots(input_ids)
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(slots.sum())} image slots in the prompt for {feats.shape[0]} image(s) of "
                                 f"{feats.shape[1]} features: build inputs with the Qwen-VL processor")
            embeds = embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))
        out = self.transformer(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state))

    def generate(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                 do_sample: bool = False, eos_token_id=None, pad_token_id: int | None = None, **unused) -> torch.Tensor:
        """Greedy decoding with a KV cache (:func:`model.layers.greedy_generate`), stopping at the chat
        format's stop words. The checkpoint's own generation config samples (top_p); evaluation here is
        greedy."""
        if do_sample:
            raise ValueError("QWenLMHeadModel.generate decodes greedily; do_sample=True is not supported")
        eos = eos_token_id if eos_token_id is not None else self.generation_eos
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        return greedy_generate(self, input_ids, (eos,) if isinstance(eos, int) else tuple(eos), attention_mask,
                               max_new_tokens, pad, pixel_values=pixel_values)
