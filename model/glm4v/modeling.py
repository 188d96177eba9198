"""ChatGLMForConditionalGeneration (GLM-4V): the tower's image vectors spliced into the GLM-4 decoder's input.

The prompt holds each image as three ids, ``<|begin_of_image|> <|endoftext|> <|end_of_image|>`` at raw positions
b, b+1, b+2. At prefill those three embeddings are *replaced* by the tower's 2 + N vectors (boi, the N = 1600
image features, eoi, all already divided by the scaling factor), so the decoder's sequence is N - 1 longer than
the prompt. Position ids are the original's: raw positions up to boi (boi keeps b), then b+1 for all N image
features, then the raw positions from eoi on (eoi b+2, text b+3, ...) -- the image occupies three position values
and every text token keeps its raw index. The causal mask runs over the merged sequence order, never over
position ids. Decoding continues at raw positions (prompt length + t); the 2-D padding mask the caller keeps in
raw length is widened by the N - 1 cached image entries. One image per row, rows padded on the left only (the
original's tokenizer pads left and asserts it).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..layers import greedy_generate
from .config import ChatGLMConfig
from .glm import GLMTransformer
from .vision import EVA2CLIPModel


class Embedding(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    """``transformer``: embedding, decoder (``encoder``), ``output_layer`` and the vision side (``vision``)."""

    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.embedding = Embedding(cfg)
        self.encoder = GLMTransformer(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(cfg)


def image_positions(input_ids: torch.Tensor, boi_id: int, eoi_id: int) -> torch.Tensor:
    """Long ``[b]``: the raw position of each row's ``<|begin_of_image|>``, checked to be the template's triple."""
    rows = []
    for i, ids in enumerate(input_ids.tolist()):
        if ids.count(boi_id) != 1 or ids.count(eoi_id) != 1:
            raise ValueError(f"row {i} has {ids.count(boi_id)} begin-of-image and {ids.count(eoi_id)} end-of-image "
                             "tokens: GLM-4V takes exactly one image per row; build inputs with the GLM-4V processor")
        b = ids.index(boi_id)
        if ids.index(eoi_id) != b + 2:
            raise ValueError(f"row {i}: the image ids at {b}..{ids.index(eoi_id)} are not the template's "
                             "<|begin_of_image|> <|endoftext|> <|end_of_image|> triple")
        rows.append(b)
    return torch.tensor(rows, device=input_ids.device)


def splice_positions(position_ids: torch.Tensor, boi: torch.Tensor, n: int) -> torch.Tensor:
    """Merged position ids: raw [0, b] (boi at b), b+1 repeated ``n`` times, then raw [b+2, ...) (eoi and text)."""
    return torch.stack([torch.cat([p[:b + 1], p[b + 1].repeat(n), p[b + 2:]]) for p, b in zip(position_ids, boi.tolist())])


def splice_embeddings(embeds: torch.Tensor, image: torch.Tensor, boi: torch.Tensor) -> torch.Tensor:
    """The three image ids' embeddings of each row replaced by that row's 2 + n image vectors."""
    return torch.stack([torch.cat([e[:b], im.to(e.dtype), e[b + 3:]]) for e, im, b in zip(embeds, image, boi.tolist())])


def splice_mask(mask: torch.Tensor, boi: torch.Tensor, n: int) -> torch.Tensor:
    """A raw 2-D padding mask widened over the image: boi's entry, ``n`` ones, then the rest from eoi on."""
    return torch.stack([torch.cat([m[:b + 1], m.new_ones(n), m[b + 2:]]) for m, b in zip(mask, boi.tolist())])


def image_token_mask(input_ids: torch.Tensor, boi_id: int, eoi_id: int, n: int) -> torch.Tensor:
    """Bool ``[b, s + n - 1]`` over the merged sequence: True at the ``n`` image features (boi / eoi are not)."""
    boi = image_positions(input_ids, boi_id, eoi_id)
    out = torch.zeros(input_ids.shape[0], input_ids.shape[1] + n - 1, dtype=torch.bool, device=input_ids.device)
    for row, b in enumerate(boi.tolist()):
        out[row, b + 1:b + 1 + n] = True
    return out


def _left_padded(mask: torch.Tensor) -> bool:
    """Whether every row's zeros come before its ones (a row may be all zeros)."""
    m = mask.long()
    return bool((m[:, 1:] >= m[:, :-1]).all())


class ChatGLMForConditionalGeneration(nn.Module):
    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = ChatGLMModel(cfg)
        self.generation_eos: tuple[int, ...] = cfg.eos_ids
        self.pad_token_id: int | None = cfg.pad_token_id

    @property
    def image_tokens(self) -> int:
        return self.config.vision.image_tokens

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return image_token_mask(input_ids, self.config.boi_token_id, self.config.eoi_token_id, self.image_tokens)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, position_ids=None,
                past_key_values=None, use_cache: bool = False, **unused) -> CausalLMOutputWithPast:
        """``input_ids`` / ``attention_mask`` / ``position_ids`` in raw prompt terms (three ids per image); the
        logits cover the merged sequence, as the original's."""
        b, s = input_ids.shape
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and not _left_padded(attention_mask):
            raise ValueError("GLM-4V pads on the left only (as the original tokenizer): the attention mask has a "
                             "padding entry after a real token")
        if position_ids is None:
            if past and attention_mask is None:
                raise ValueError("decoding with a cache needs position_ids or the raw attention_mask (the image's "
                                 "features share one position, so the cache length is not the next position)")
            raw = attention_mask if attention_mask is not None else torch.ones(b, s, dtype=torch.long,
                                                                               device=input_ids.device)
            position_ids = (raw.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
        embeds = self.transformer.embedding(input_ids)
        if pixel_values is not None:
            if past:
                raise ValueError("pixel_values are only taken at prefill (an empty cache)")
            boi = image_positions(input_ids, self.config.boi_token_id, self.config.eoi_token_id)
            image = self.transformer.vision(pixel_values)
            if image.shape[0] != b:
                raise ValueError(f"{image.shape[0]} images for {b} prompt rows: GLM-4V takes one image per row")
            n = image.shape[1] - 2
            embeds = splice_embeddings(embeds, image, boi)
            position_ids = splice_positions(position_ids, boi, n)
            if attention_mask is not None:
                attention_mask = splice_mask(attention_mask, boi, n)
        elif attention_mask is not None and attention_mask.shape[1] < past + s:
            # decoding after an image prefill: the cache holds n - 1 more entries than the raw mask counts;
            # with left padding they are all real, wherever the ones are inserted after the padding
            extra = past + s - attention_mask.shape[1]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, extra)], dim=1)
        out = self.transformer.encoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=cache, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=self.transformer.output_layer(out.last_hidden_state))

    def generate(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                 do_sample: bool = False, eos_token_id=None, pad_token_id: int | None = None, **unused) -> torch.Tensor:
        """Greedy decoding with a KV cache (:func:`model.layers.greedy_generate`), stopping at the checkpoint's eos
        ids (``<|endoftext|>``, ``<|user|>``, ``<|observation|>``). Returns the raw prompt ids followed by the new
        ones. The checkpoint's generation config samples; VLMEvalKit's GLM4v decodes greedily, as here."""
        if do_sample:
            raise ValueError("ChatGLMForConditionalGeneration.generate decodes greedily; do_sample=True is not supported")
        eos = eos_token_id if eos_token_id is not None else self.generation_eos
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        return greedy_generate(self, input_ids, (eos,) if isinstance(eos, int) else tuple(eos), attention_mask,
                               max_new_tokens, pad, pixel_values=pixel_values)
